import functools
import math

import pytest
import timm
import torch
import torch.nn as nn

from dcvit_engine.adapter import UnsupportedModelError, from_timm, spec_from_timm
from dcvit_engine.reference import ViTReference, reference_from_timm, state_shapes
from dcvit_engine.spec import AttentionSpec, BlockSpec, ViTSpec

GLU_MLP_GATE_LAST = functools.partial(timm.layers.GluMlp, act_layer=nn.SiLU, gate_last=True)
GLU_MLP_GATE_LAST.__name__ = "GluMlp(gate_last=True)"
TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=10)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm()).item()


def create(name: str, **kwargs) -> nn.Module:
    # timm's trunc-normal init is slow on 2 cores; randomize_ sets what it would have set
    return randomize_(timm.create_model(name, pretrained=False, weight_init="skip", **kwargs))


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random values for the position embedding, the tokens and the vectors timm initialises
    to constants (norms, biases, LayerScale gammas), so that a wrongly wired one shows up."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() <= 1 or "token" in name or name == "pos_embed":
                base = 1.0 if name.endswith("norm1.weight") or name.endswith("norm2.weight") else 0.0
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=gen))
    return model


def check_against_timm(model: nn.Module, batch: int = 2, full_forward: bool = True) -> ViTReference:
    model = model.eval()
    reference = reference_from_timm(model)
    x = torch.randn(batch, model.patch_embed.proj.in_channels, *model.patch_embed.img_size,
                    generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_feats = model.forward_features(x)
        feats = reference.forward_features(x)
        assert rel_err(feats, expected_feats) < 1e-5
        assert rel_err(reference.forward_head(feats), model.forward_head(expected_feats)) < 1e-5
        if full_forward:
            assert rel_err(reference(x), model(x)) < 1e-5
    return reference


@pytest.mark.parametrize("name", [
    "vit_tiny_patch16_224", "vit_small_patch16_224", "deit_tiny_patch16_224",
    "deit_small_patch16_224", "deit_small_distilled_patch16_224",
    "vit_base_patch16_224", "deit_base_patch16_224",
])
def test_reference_matches_timm_zoo_models(name):
    torch.manual_seed(0)
    check_against_timm(create(name), batch=1, full_forward=False)


@pytest.mark.parametrize("kwargs", [
    dict(init_values=1e-5),
    dict(qkv_bias=False),
    dict(qk_norm=True),
    dict(class_token=False, global_pool="avg"),                 # fc_norm by default with avg
    dict(global_pool="avg", fc_norm=True),                       # avg over non-prefix tokens
    dict(global_pool=""),                                        # head applied to every token
    dict(pre_norm=True),                                         # norm_pre, no patch bias
    dict(no_embed_class=True),
    dict(img_size=(32, 48)),
    dict(final_norm=False),
    dict(num_classes=0),
    dict(in_chans=1, mlp_ratio=2.5),
    dict(init_values=1e-5, qk_norm=True, qkv_bias=False, no_embed_class=True, pre_norm=True,
         img_size=(40, 24)),
    # version-2 parts in timm's VisionTransformer
    dict(reg_tokens=3),
    dict(reg_tokens=2, class_token=False, global_pool="avg", no_embed_class=True),
    dict(act_layer="gelu_tanh"),
    dict(act_layer="quick_gelu", pre_norm=True),
    dict(act_layer="silu"),
    dict(scale_attn_norm=True, scale_mlp_norm=True),
    dict(pos_embed="none", reg_tokens=1),
    dict(dynamic_img_size=True),
    dict(mlp_layer=GLU_MLP_GATE_LAST, mlp_ratio=2.0),            # [value | gate] fc1 -> [gate | value]
    dict(mlp_layer=timm.layers.SwiGLU, scale_mlp_norm=True),
    dict(mlp_layer=timm.layers.SwiGLUPacked, init_values=1e-5),
    dict(global_pool="map", class_token=False),
    dict(global_pool="map", reg_tokens=2, act_layer="gelu_tanh"),
], ids=lambda kw: ",".join(f"{k}={getattr(v, '__name__', v)}" for k, v in kw.items()))
def test_reference_matches_custom_timm_configs(kwargs):
    torch.manual_seed(0)
    config = dict(TINY, **kwargs)
    reference = check_against_timm(create("vit_tiny_patch16_224", **config))
    spec = reference.spec
    assert spec.img_size == ((config["img_size"],) * 2 if isinstance(config["img_size"], int)
                             else config["img_size"])
    assert spec.blocks[0].layer_scale == ("init_values" in kwargs)
    assert spec.reg_tokens == kwargs.get("reg_tokens", 0)


def test_distilled_tiny_config_and_train_mode_follows_eval():
    torch.manual_seed(0)
    model = create("deit_tiny_distilled_patch16_224", **TINY)
    reference = check_against_timm(model)
    assert reference.spec.dist_token and "head_dist.weight" in reference.state_dict()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reference.train()(x), reference.eval()(x))


def test_spec_from_timm_fields():
    model = timm.create_model("vit_tiny_patch16_224", **dict(TINY, img_size=(32, 48), init_values=0.1))
    spec = spec_from_timm(model)
    assert spec.img_size == (32, 48) and spec.patch_size == 8 and spec.grid == (4, 6)
    assert spec.norm_eps == 1e-6 and not spec.prop_attn and spec.global_pool == "token"
    attn = spec.blocks[0].attn
    assert attn.qk_dims == [16, 16, 16] and attn.v_dims == [16, 16, 16]
    assert attn.scale == 16 ** -0.5 and spec.blocks[0].mlp_hidden == 192
    spec2, state = from_timm(model)
    assert spec2 == spec and set(state) == set(model.state_dict())
    assert state_shapes(spec) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kwargs, feature", [
    (dict(global_pool="max", fc_norm=False), "global_pool 'max'"),
    (dict(act_layer=nn.ReLU), "blocks.0.mlp.act is ReLU"),
    (dict(norm_layer="rmsnorm"), "only LayerNorm"),
    (dict(embed_norm_layer="layernorm"), "patch_embed norm"),
    (dict(attn_layer="diff"), "blocks.0.attn is DiffAttention"),
    (dict(proj_bias=False), "no bias"),
    (dict(global_pool="avg", pool_include_prefix=True), "pool_include_prefix"),
    (dict(patch_size=(8, 4)), "non-square patch"),
])
def test_unsupported_timm_features_are_named(kwargs, feature):
    model = timm.create_model("vit_tiny_patch16_224", **dict(TINY, **kwargs))
    with pytest.raises(UnsupportedModelError, match=feature):
        spec_from_timm(model)


def test_unsupported_model_classes():
    from timm.models.eva import Eva
    with pytest.raises(UnsupportedModelError, match="blocks.0 is EvaBlockPostNorm"):
        spec_from_timm(Eva(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3,
                           use_rot_pos_emb=True, use_post_norm=True))
    with pytest.raises(UnsupportedModelError, match="rope: RotaryEmbeddingMRope"):
        spec_from_timm(Eva(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3,
                           use_rot_pos_emb=True, rope_type="mrope", use_abs_pos_emb=False))
    with pytest.raises(UnsupportedModelError, match=r"relative position bias \(blocks.0.attn"):
        spec_from_timm(timm.create_model("beit_base_patch16_224", img_size=32, patch_size=8, embed_dim=48,
                                         depth=1, num_heads=3))
    with pytest.raises(UnsupportedModelError,
                       match=r"relative position bias \(\(model\): VisionTransformerRelPos"):
        spec_from_timm(timm.create_model("vit_relpos_base_patch16_224", img_size=32, patch_size=8,
                                         embed_dim=48, depth=1, num_heads=3))
    with pytest.raises(UnsupportedModelError, match=r"parallel blocks \(blocks.0"):
        spec_from_timm(timm.create_model("vit_base_patch16_224", img_size=32, patch_size=8, embed_dim=48,
                                         depth=1, num_heads=3,
                                         block_fn=timm.models.vision_transformer.ParallelScalingBlock))
    with pytest.raises(UnsupportedModelError, match="model class Linear"):
        spec_from_timm(nn.Linear(3, 3))
    model = timm.create_model("vit_tiny_patch16_224", **TINY)
    model.blocks[1].ls1 = timm.layers.LayerScale(48)
    with pytest.raises(UnsupportedModelError, match="only one of its two branches"):
        spec_from_timm(model)
    assert issubclass(UnsupportedModelError, ValueError)


# ---- pruned / ragged specs ---------------------------------------------------------

def pruned_spec(**overrides) -> ViTSpec:
    fields = dict(img_size=(24, 40), patch_size=8, in_chans=3, embed_dim=24, num_classes=7,
                  class_token=True, dist_token=False, global_pool="token", fc_norm=False,
                  pre_norm=False, final_norm=True, no_embed_class=False, norm_eps=1e-6,
                  prop_attn=False)
    fields.update(overrides)
    blocks = [
        BlockSpec(AttentionSpec([16, 5, 11], [16, 7, 3], 16 ** -0.5), 37, layer_scale=True),
        BlockSpec(None, 50, layer_scale=True),
        BlockSpec(AttentionSpec([16, 16], [9, 16], 16 ** -0.5, qkv_bias=False, proj_bias=False,
                                qk_norm=True), 0),
        BlockSpec(None, 0),
        BlockSpec(AttentionSpec([3], [5], 0.25), 13),
    ]
    return ViTSpec(blocks=blocks, **fields).validate()


def random_reference(spec: ViTSpec, seed: int = 0) -> ViTReference:
    torch.manual_seed(seed)
    model = ViTReference(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() <= 1 else 1 / math.sqrt(p.shape[-1])))
            if p.dim() == 1:
                p.add_(0.5)
    return model.eval()


def float64_forward(spec: ViTSpec, sd: dict, x: torch.Tensor) -> torch.Tensor:
    """The model written out by hand from the spec contract, in float64."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()

    def ln(t, prefix, eps=spec.norm_eps):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + eps) * sd[prefix + ".weight"] + sd[prefix + ".bias"]

    def linear(t, prefix):
        out = t @ sd[prefix + ".weight"].T
        return out + sd[prefix + ".bias"] if prefix + ".bias" in sd else out

    p = spec.patch_size
    b, c, h, w = x.shape
    patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
    tokens = patches @ sd["patch_embed.proj.weight"].reshape(spec.embed_dim, -1).T
    tokens = tokens + sd["patch_embed.proj.bias"]
    tokens = torch.cat([sd["cls_token"].expand(b, -1, -1), tokens], 1) + sd["pos_embed"]
    for i, block in enumerate(spec.blocks):
        pre = f"blocks.{i}."
        if block.attn is not None:
            a = block.attn
            y = linear(ln(tokens, pre + "norm1"), pre + "attn.qkv")
            outs, q0, k0, v0 = [], 0, a.qk_total, 2 * a.qk_total
            for dq, dv in zip(a.qk_dims, a.v_dims):
                q, k, v = y[..., q0:q0 + dq], y[..., k0:k0 + dq], y[..., v0:v0 + dv]
                q0, k0, v0 = q0 + dq, k0 + dq, v0 + dv
                if a.qk_norm:
                    q, k = ln(q, pre + "attn.q_norm"), ln(k, pre + "attn.k_norm")
                scores = torch.einsum("bnd,bmd->bnm", q, k) * a.scale
                outs.append(torch.softmax(scores, -1) @ v)
            y = linear(torch.cat(outs, -1), pre + "attn.proj")
            tokens = tokens + (y * sd[pre + "ls1.gamma"] if block.layer_scale else y)
        if block.mlp_hidden:
            y = linear(ln(tokens, pre + "norm2"), pre + "mlp.fc1")
            y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
            y = linear(y, pre + "mlp.fc2")
            tokens = tokens + (y * sd[pre + "ls2.gamma"] if block.layer_scale else y)
    tokens = ln(tokens, "norm")
    return linear(tokens[:, 0], "head")


def test_ragged_pruned_reference_matches_float64_by_hand():
    spec = pruned_spec()
    model = random_reference(spec)
    x = torch.randn(2, 3, 24, 40)
    expected = float64_forward(spec, model.state_dict(), x)
    with torch.no_grad():
        assert rel_err(model(x), expected) < 1e-5
        assert rel_err(model.double()(x.double()), expected) < 1e-12


def test_pruned_state_dict_follows_the_contract():
    spec = pruned_spec()
    shapes = state_shapes(spec)
    assert shapes["blocks.0.attn.qkv.weight"] == (2 * 32 + 26, 24)
    assert shapes["blocks.0.attn.proj.weight"] == (24, 26)
    assert shapes["blocks.2.attn.q_norm.weight"] == (16,)
    assert "blocks.2.attn.qkv.bias" not in shapes and "blocks.2.attn.proj.bias" not in shapes
    for removed in ("blocks.1.norm1.weight", "blocks.1.attn.qkv.weight", "blocks.1.ls1.gamma",
                    "blocks.2.norm2.weight", "blocks.2.mlp.fc1.weight", "blocks.3.ls2.gamma"):
        assert not any(name.startswith(removed.rsplit(".", 1)[0]) for name in shapes), removed
    assert shapes["blocks.1.ls2.gamma"] == (24,)
    assert set(shapes) == set(ViTReference(spec).state_dict())


def test_proportional_attention_adds_log_size_per_key():
    spec = pruned_spec(prop_attn=True)
    attn = random_reference(spec).blocks[0].attn.double()
    x = torch.randn(2, 6, 24, dtype=torch.float64)
    size = torch.tensor([[1, 2, 1, 3, 1, 4], [2, 1, 1, 1, 5, 1]], dtype=torch.float64).unsqueeze(-1)
    q, k, v = attn.qkv(x).split([32, 32, 26], -1)
    outs = []
    for qh, kh, vh in zip(q.split([16, 5, 11], -1), k.split([16, 5, 11], -1), v.split([16, 7, 3], -1)):
        scores = qh @ kh.transpose(1, 2) * attn.scale + size.log().transpose(1, 2)
        outs.append(scores.softmax(-1) @ vh)
    expected = attn.proj(torch.cat(outs, -1))
    with torch.no_grad():
        assert rel_err(attn(x, size), expected) < 1e-12
        assert rel_err(attn(x, torch.ones_like(size)), attn(x, None)) < 1e-12
        # uniform heads take the batched path: same bias semantics
        uniform = random_reference(spec).blocks[2].attn.double()
        one = uniform(x, size)
        per_key = torch.stack([uniform(x[j:j + 1], size[j:j + 1])[0] for j in range(2)])
        assert rel_err(one, per_key) < 1e-12


def test_input_shape_is_checked():
    model = random_reference(pruned_spec())
    for bad in (torch.randn(1, 1, 24, 40), torch.randn(1, 3, 40, 24), torch.randn(3, 24, 40)):
        with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 24, 40\)"):
            model(bad)


def test_avg_pool_fc_norm_and_no_head_on_pruned_spec():
    spec = pruned_spec(class_token=False, global_pool="avg", fc_norm=True, final_norm=False,
                       num_classes=0)
    model = random_reference(spec)
    x = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 15, 24)
        assert rel_err(model(x), model.fc_norm(feats.mean(1))) < 1e-6
