import json

import pytest

from dcvit_engine.spec import (
    SPEC_VERSION,
    AttentionSpec,
    BlockSpec,
    MergeSpec,
    ViTSpec,
    final_tokens,
    merge_schedule,
    tokens_per_block,
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
