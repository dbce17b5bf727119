import json

import pytest
import torch

from dcvit_engine.spec import (
    SPEC_VERSION,
    AttentionSpec,
    AttnPoolSpec,
    BlockSpec,
    MergeSpec,
    RopeSpec,
    ViTSpec,
    final_tokens,
    merge_schedule,
    tokens_per_block,
    v2_features,
)


def make_spec(blocks=None, **overrides) -> ViTSpec:
    fields = dict(img_size=(32, 40), patch_size=8, in_chans=3, embed_dim=48, num_classes=10,
                  class_token=True, dist_token=False, global_pool="token", fc_norm=False,
                  pre_norm=False, final_norm=True, no_embed_class=False, norm_eps=1e-6,
                  prop_attn=False)
    fields.update(overrides)
    if blocks is None:
        blocks = [BlockSpec(AttentionSpec([16, 16, 16], [16, 16, 16], 16 ** -0.5), 192)
                  for _ in range(3)]
    return ViTSpec(blocks=blocks, **fields)


def mixed_spec() -> ViTSpec:
    return make_spec(blocks=[
        BlockSpec(AttentionSpec([16, 5, 11], [16, 7, 3], 0.25, qkv_bias=False), 37, layer_scale=True),
        BlockSpec(None, 50, merge=MergeSpec("tome", r=3)),
        BlockSpec(AttentionSpec([16] * 3, [16] * 3, 0.25, qk_norm=True, proj_bias=False), 0),
        BlockSpec(None, 0),
    ], prop_attn=True, dist_token=True)


def test_geometry_properties():
    spec = make_spec()
    assert spec.grid == (4, 5)
    assert spec.num_patches == 20
    assert spec.num_prefix_tokens == 1
    assert spec.depth == 3
    assert make_spec(dist_token=True).num_prefix_tokens == 2
    assert make_spec(class_token=False, global_pool="avg").num_prefix_tokens == 0
    # timm's PatchEmbed drops a remainder that does not fill a patch
    assert make_spec(img_size=(35, 47)).grid == (4, 5)


def test_attention_properties():
    attn = AttentionSpec([16, 5, 11], [16, 7, 3], 0.25)
    assert (attn.num_heads, attn.qk_total, attn.v_total, attn.qkv_out) == (3, 32, 26, 90)


def test_json_round_trip_keeps_everything():
    spec = mixed_spec().validate()
    text = spec.to_json()
    data = json.loads(text)
    assert data["version"] == SPEC_VERSION
    assert data["blocks"][1]["attn"] is None
    back = ViTSpec.from_json(text)
    assert back == spec
    assert isinstance(back.img_size, tuple)
    assert ViTSpec.from_dict(spec.to_dict()) == spec


def test_from_dict_rejects_unsupported_version():
    data = make_spec().to_dict()
    data["version"] = SPEC_VERSION + 1
    with pytest.raises(ValueError, match="unsupported spec version"):
        ViTSpec.from_dict(data)


@pytest.mark.parametrize("version", [3, 0, "2", None, True])
def test_newer_or_unknown_version_is_a_version_error_not_a_field_error(version):
    """A spec of a later format (new fields, changed shapes) fails on its version first."""
    data = v2_spec().to_dict()
    data.update(version=version, some_v3_field={"x": 1})
    data["blocks"][0]["mlp_hidden"] = "changed in v3"
    with pytest.raises(ValueError, match=r"^invalid spec: version: unsupported spec version"):
        ViTSpec.from_dict(data)


# what dcvit_engine 0.x (spec version 1) wrote: no v2 field at all
V1_SPEC_JSON = """{"version": 1, "img_size": [32, 40], "patch_size": 8, "in_chans": 3, "embed_dim": 48,
 "num_classes": 10, "class_token": true, "dist_token": false, "global_pool": "token", "fc_norm": false,
 "pre_norm": false, "final_norm": true, "no_embed_class": false, "norm_eps": 1e-06, "prop_attn": false,
 "blocks": [{"attn": {"qk_dims": [16, 5], "v_dims": [16, 7], "scale": 0.25, "qkv_bias": true,
   "proj_bias": true, "qk_norm": false}, "mlp_hidden": 37, "layer_scale": true, "merge": null},
  {"attn": null, "mlp_hidden": 50, "layer_scale": false, "merge": {"kind": "tome", "r": 3, "axis": ""}}]}"""


def test_version_1_spec_file_reads_as_version_2_with_v1_meaning(tmp_path):
    (tmp_path / "spec.json").write_text(V1_SPEC_JSON)
    spec = ViTSpec.load(tmp_path / "spec.json")
    assert spec.version == SPEC_VERSION == 2
    assert (spec.reg_tokens, spec.abs_pos_embed, spec.rope, spec.attn_pool) == (0, True, None, None)
    assert all((b.mlp_act, b.mlp_gated, b.mlp_inner_norm) == ("gelu", False, False) for b in spec.blocks)
    assert not spec.blocks[0].attn.inner_norm and v2_features(spec) == []
    assert spec.num_prefix_tokens == 1 and spec.blocks[1].merge == MergeSpec("tome", r=3)
    assert ViTSpec.from_json(spec.to_json()) == spec  # re-written as version 2


def test_version_1_artifact_loads(tmp_path):
    from dcvit_engine import artifact
    from dcvit_engine.reference import ViTReference
    spec = ViTSpec.from_json(V1_SPEC_JSON)
    torch.manual_seed(0)
    model = ViTReference(spec).eval()
    artifact.save(model, tmp_path / "a")
    (tmp_path / "a" / "spec.json").write_text(V1_SPEC_JSON)  # as the old version wrote it
    loaded = artifact.load(tmp_path / "a")
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def v2_spec() -> ViTSpec:
    blocks = [BlockSpec(AttentionSpec([16] * 3, [16, 9, 16], 0.25, inner_norm=True), 40, layer_scale=True,
                        mlp_act="silu", mlp_gated=True, mlp_inner_norm=True),
              BlockSpec(AttentionSpec([16] * 3, [16] * 3, 0.25), 24, mlp_act="quick_gelu")]
    return make_spec(blocks=blocks, reg_tokens=4, abs_pos_embed=False, global_pool="map",
                     rope=RopeSpec("cat", 16, 10000.0, rotate_half=False, ref_feat_shape=[16, 16]),
                     attn_pool=AttnPoolSpec(num_heads=4, mlp_hidden=96, include_prefix=True)).validate()


def test_a_spec_without_v2_features_is_written_with_the_v1_fields_only():
    """So that a version-1 reader (it checks field names first) fails on the version."""
    data = json.loads(ViTSpec.from_json(V1_SPEC_JSON).to_json())
    v1 = json.loads(V1_SPEC_JSON)
    assert data["version"] == 2 and set(data) == set(v1)
    assert [set(b) for b in data["blocks"]] == [set(b) for b in v1["blocks"]]
    assert set(data["blocks"][0]["attn"]) == set(v1["blocks"][0]["attn"])


def test_version_2_fields_round_trip():
    spec = v2_spec()
    data = json.loads(spec.to_json())
    assert data["version"] == 2 and data["reg_tokens"] == 4 and data["rope"]["kind"] == "cat"
    assert data["attn_pool"]["num_heads"] == 4 and data["blocks"][0]["mlp_gated"] is True
    assert ViTSpec.from_json(spec.to_json()) == spec
    assert spec.num_prefix_tokens == 5
    assert v2_features(spec)[:4] == ["4 register tokens (reg_tokens)",
                                     "no absolute position embedding (abs_pos_embed = false)",
                                     "rotary position embedding (rope, kind 'cat')",
                                     "the attention-pool head (global_pool 'map', attn_pool)"]


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["blocks"][0].update(mlp_act="relu"), r"blocks\[0\].mlp_act: expected one of"),
    (lambda d: d["blocks"][0].update(mlp_gated=1), r"blocks\[0\].mlp_gated: expected true/false"),
    (lambda d: d["blocks"][0]["attn"].update(inner_norm="yes"), "inner_norm"),
    (lambda d: d.update(reg_tokens=-1), "reg_tokens: must be >= 0"),
    (lambda d: d["rope"].update(dim=14), "multiple of 4"),
    (lambda d: d["rope"].update(kind="mrope"), r"rope.kind: expected one of"),
    (lambda d: d["rope"].update(kind="mixed", ref_feat_shape=None, rotate_half=True), "mixed RoPE"),
    (lambda d: d["rope"].update(grid_indexing="yx"), "grid_indexing"),
    (lambda d: d["rope"].update(min_period=1.0), "go together"),
    (lambda d: d["rope"].update(ref_feat_shape=[16]), r"expected \[rows, cols\]"),
    (lambda d: d["blocks"][1]["attn"].update(qk_dims=[16, 8, 16]), "RoPE rotates whole heads"),
    (lambda d: d["blocks"][1].update(merge={"kind": "atme", "axis": "w"}), "token merging with RoPE"),
    (lambda d: d.update(attn_pool=None), "global_pool = 'map'"),
    (lambda d: d["attn_pool"].update(num_heads=5), "do not divide embed_dim"),
    (lambda d: d["attn_pool"].update(pool="max"), r"attn_pool.pool"),
    (lambda d: d["attn_pool"].update(extra=1), "unknown field"),
    (lambda d: d.update(blocks=d["blocks"][:1] + [dict(d["blocks"][1], merge={
        "kind": "tome", "r": 2, "axis": ""})]), "token merging with RoPE is not supported yet"),
])
def test_version_2_validation_errors(mutate, message):
    data = v2_spec().to_dict()
    mutate(data)
    with pytest.raises(ValueError, match=message):
        ViTSpec.from_dict(data)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(extra=1), "unknown field"),
    (lambda d: d.pop("embed_dim"), "missing field"),
    (lambda d: d.update(embed_dim=0), "embed_dim: must be >= 1"),
    (lambda d: d.update(embed_dim=48.0), "embed_dim: expected an integer"),
    (lambda d: d.update(class_token=1), "class_token: expected true/false"),
    (lambda d: d.update(global_pool="max"), "global_pool"),
    (lambda d: d.update(class_token=False), "'token' pooling needs class_token"),
    (lambda d: d.update(norm_eps=0), "norm_eps"),
    (lambda d: d.update(patch_size=64), "larger than the image"),
    (lambda d: d["blocks"][0]["attn"].update(qk_dims=[16, 0, 16]), r"blocks\[0\].attn.qk_dims\[1\]"),
    (lambda d: d["blocks"][0]["attn"].update(v_dims=[16, 16]), "heads"),
    (lambda d: d["blocks"][0]["attn"].update(qk_dims=[]), "non-empty"),
    (lambda d: d["blocks"][0]["attn"].update(scale=-1.0), "scale"),
    (lambda d: d["blocks"][0]["attn"].update(qk_norm=True, qk_dims=[16, 8, 16]), "qk_norm needs"),
    (lambda d: d["blocks"][1].update(mlp_hidden=-1), r"blocks\[1\].mlp_hidden"),
    (lambda d: d["blocks"][1].update(mlp_hidden=True), "expected an integer"),
    (lambda d: d["blocks"][1].update(merge={"kind": "swap"}), "kind"),
    (lambda d: d["blocks"][1].update(merge={"kind": "tome", "r": 0}), "at least 1"),
    (lambda d: d["blocks"][1].update(merge={"kind": "atme", "axis": "x"}), "axis"),
    (lambda d: d["blocks"][1].update(merge={"kind": "tome", "r": 11}), "at most 10"),
    (lambda d: d["blocks"].__setitem__(0, "block"), "expected an object"),
])
def test_from_dict_validation_errors(mutate, message):
    data = make_spec().to_dict()
    mutate(data)
    with pytest.raises(ValueError, match=message):
        ViTSpec.from_dict(data)


def test_distillation_token_constraints():
    with pytest.raises(ValueError, match="needs class_token"):
        make_spec(dist_token=True, class_token=False, global_pool="avg").validate()
    with pytest.raises(ValueError, match="distilled head"):
        make_spec(dist_token=True, global_pool="avg").validate()
    with pytest.raises(ValueError, match="distilled head"):
        make_spec(dist_token=True, fc_norm=True).validate()


def test_qk_norm_allowed_at_teacher_width():
    AttentionSpec([16, 16], [16, 4], 16 ** -0.5, qk_norm=True).validate()


def test_tokens_per_block_tome_removes_r_and_protects_prefix():
    blocks = [BlockSpec(None, 8, merge=MergeSpec("tome", r=4)) for _ in range(3)]
    spec = make_spec(blocks=blocks, img_size=(32, 32), dist_token=True)  # 2 + 16 tokens
    assert tokens_per_block(spec) == [18, 14, 10]
    assert final_tokens(spec) == 6
    # 6 tokens with 2 protected: only (6 - 2) // 2 = 2 can merge
    spec.blocks.append(BlockSpec(None, 8, merge=MergeSpec("tome", r=3)))
    with pytest.raises(ValueError, match=r"blocks\[3\].merge.r.*at most 2"):
        spec.validate()


def test_tokens_per_block_atme_halves_axis_with_ceil():
    blocks = [BlockSpec(None, 8, merge=MergeSpec("atme", axis=a)) for a in ("w", "h", "w", "h")]
    blocks.append(BlockSpec(None, 8))
    spec = make_spec(blocks=blocks, img_size=(56, 40))  # grid 7 x 5, 1 prefix token
    assert tokens_per_block(spec) == [36, 1 + 7 * 3, 1 + 4 * 3, 1 + 4 * 2, 1 + 2 * 2]
    assert [g for _, _, g in merge_schedule(spec)] == [(7, 5), (7, 3), (4, 3), (4, 2), (2, 2)]
    assert final_tokens(spec) == 5


def test_atme_needs_grid_and_two_columns():
    after_tome = [BlockSpec(None, 8, merge=MergeSpec("tome", r=2)),
                  BlockSpec(None, 8, merge=MergeSpec("atme", axis="w"))]
    with pytest.raises(ValueError, match="broke it"):
        make_spec(blocks=after_tome).validate()
    single_column = [BlockSpec(None, 8, merge=MergeSpec("atme", axis="w"))]
    with pytest.raises(ValueError, match="cannot halve"):
        make_spec(blocks=single_column, img_size=(32, 8)).validate()


def test_final_tokens_without_blocks():
    assert final_tokens(make_spec(blocks=[])) == 21


def test_load_from_file_and_folder_with_clear_errors(tmp_path):
    spec = mixed_spec()
    (tmp_path / "spec.json").write_text(spec.to_json())
    assert ViTSpec.load(tmp_path) == spec
    assert ViTSpec.load(tmp_path / "spec.json") == spec
    with pytest.raises(FileNotFoundError, match="no spec"):
        ViTSpec.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without spec.json"):
        ViTSpec.load(tmp_path / "empty")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ViTSpec.load(tmp_path / "bad.json")
