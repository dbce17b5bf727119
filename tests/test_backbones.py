"""The backbones of issue 19 (registers, RoPE, gated MLPs, QuickGELU, attention-pool heads):
timm's model -> spec -> reference module equals timm's forward, shrunk and at full size, and
the reference exports. Random weights (no downloads); every vector timm initialises to a
constant is randomised so that a miswired one shows up."""
import pytest
import timm
import torch

from dcvit_engine.adapter import from_timm
from dcvit_engine.export import export_model
from dcvit_engine.reference import reference_from_timm
from dcvit_engine.rope import apply_rope, half_rotation_order, rope_tables

# name -> (timm kwargs of the shrunk model, what its spec must say)
NAMED = {
    "vit_small_patch14_reg4_dinov2": (dict(depth=3, img_size=42), dict(reg_tokens=4, layer_scale=True)),
    "vit_small_patch16_dinov3": (dict(depth=2, img_size=48), dict(reg_tokens=4, rope="dinov3")),
    "vit_base_patch16_clip_quickgelu_224": (dict(depth=2, img_size=48), dict(act="quick_gelu")),
    "vit_base_patch16_siglip_224": (dict(depth=2, img_size=48), dict(pool="map")),
    "eva02_tiny_patch14_224": (dict(depth=4, img_size=42), dict(rope="cat", gated=True)),
    "vit_base_patch16_rope_reg1_gap_256": (dict(depth=2, img_size=48), dict(reg_tokens=1, rope="cat")),
    "vit_pe_core_small_patch16_384": (dict(depth=2, img_size=48), dict(rope="cat", pool="map")),
}
# same families, other layouts: unfused q/k/v + SwiGLU with mlp.norm (EVA-02 base and up);
# learned per-block, per-head RoPE frequencies (RoPE-Mixed, timm RotaryEmbeddingMixed)
FAMILY = {"eva02_base_patch14_224": (dict(depth=2, img_size=42), dict(rope="cat", gated=True)),
          "vit_small_patch16_rope_mixed_224": (dict(depth=2, img_size=48), dict(rope="mixed"))}


def randomized(name: str, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() <= 1 or "token" in pname or "latent" in pname or "pos_embed" in pname:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
            elif pname == "head.weight":  # timm's Eva scales its head init by 1e-3
                p.normal_(0, p.shape[1] ** -0.5, generator=gen)
    return model


def timm_in_float64(model):
    """model.double(), with its RoPE table rebuilt by timm in float64. timm computes a fixed-size
    model's table once, in float32, at construction and .double() only casts it, while a dynamic-
    size one (DINOv3) is rebuilt at every forward in the model's dtype; the reference module does
    the latter for every kind. Both from the same float32 frequencies and grid, by timm's own code."""
    model = model.double()
    rope = getattr(model, "rope", None)
    if getattr(rope, "pos_embed", None) is not None:                # RotaryEmbeddingCat
        rope.pos_embed = rope._build_embed_cat(rope.feat_shape, rope.bands, dtype=torch.float64)
    if getattr(rope, "pos_embed_cached", None) is not None:         # RotaryEmbeddingDinoV3
        rope.pos_embed_cached = rope._create_embed(rope.feat_shape, no_aug=True)
    return model


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def images(model, batch: int, dtype=torch.float32):
    size = model.patch_embed.img_size
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1)).to(dtype)


def check_spec(spec, expect: dict) -> None:
    assert spec.reg_tokens == expect.get("reg_tokens", 0)
    assert (spec.rope.kind if spec.rope else None) == expect.get("rope")
    assert spec.global_pool == expect.get("pool", spec.global_pool)
    assert spec.blocks[0].mlp_gated == expect.get("gated", False)
    assert spec.blocks[0].mlp_act == expect.get("act", "silu" if expect.get("gated") else "gelu")
    assert spec.blocks[0].layer_scale == expect.get("layer_scale", spec.blocks[0].layer_scale)


@pytest.mark.parametrize("name", list(NAMED) + list(FAMILY))
def test_reference_equals_timm_in_float64(name):
    kwargs, expect = {**NAMED, **FAMILY}[name]
    model = randomized(name, **kwargs)
    reference = reference_from_timm(model)
    check_spec(reference.spec, expect)
    model, reference = timm_in_float64(model), reference.double()
    x = images(model, 2, torch.float64)
    with torch.no_grad():
        feats, expected_feats = reference.forward_features(x), model.forward_features(x)
        assert rel_err(feats, expected_feats) < 1e-10
        assert rel_err(reference.forward_head(feats), model.forward_head(expected_feats)) < 1e-10


@pytest.mark.parametrize("name", list(NAMED))
def test_reference_equals_unmodified_timm_in_float32(name):
    """fp32, timm untouched (its own float32 RoPE tables): the ops' fp32 scale of agreement."""
    kwargs, _ = NAMED[name]
    model = randomized(name, **kwargs)
    reference = reference_from_timm(model)
    x = images(model, 2)
    with torch.no_grad():
        assert rel_err(reference(x), model(x)) < 1e-5


@pytest.mark.parametrize("name", list(NAMED))
def test_reference_equals_timm_at_full_size(name):
    """Each named model at its own size and depth, one image, float64."""
    model = randomized(name)
    reference = reference_from_timm(model).double()
    model = timm_in_float64(model)
    x = images(model, 1, torch.float64)
    with torch.no_grad():
        assert rel_err(reference(x), model(x)) < 1e-10


@pytest.mark.parametrize("name", list(NAMED) + ["vit_small_patch16_rope_mixed_224"])
def test_export_of_the_reference(name, tmp_path):
    """ONNX (run in onnxruntime) and pt2, each verified against the reference by export_model."""
    kwargs, _ = {**NAMED, **FAMILY}[name]
    reference = reference_from_timm(randomized(name, **dict(kwargs, depth=1)))
    for fmt in ("onnx", "pt2"):
        result = export_model(reference, tmp_path / f"model.{fmt}", format=fmt)
        assert result.max_rel_diff <= 1e-4 and (tmp_path / f"model.{fmt}").is_file()


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "vit_small_patch16_dinov3",
                                  "vit_pe_core_small_patch16_384", "vit_small_patch16_rope_mixed_224"])
def test_rope_tables_equal_timms(name):
    kwargs, _ = {**NAMED, **FAMILY}[name]
    model = randomized(name, **kwargs)
    spec, state = from_timm(model)
    if spec.rope.kind == "mixed":  # block 1's tables, per head
        sin, cos = rope_tables(spec, layout="spec", freqs=state["blocks.1.attn.rope_freqs"])
        timm_sin, timm_cos = model.rope.get_embed()[1].chunk(2, dim=-1)
    else:
        sin, cos = rope_tables(spec, layout="spec")
        timm_sin, timm_cos = model.rope.get_embed(shape=list(spec.grid)).chunk(2, dim=-1)
    torch.testing.assert_close(sin, timm_sin, rtol=0, atol=1e-6)
    torch.testing.assert_close(cos, timm_cos, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "vit_small_patch16_dinov3",
                                  "vit_small_patch16_rope_mixed_224"])
def test_half_layout_with_permuted_channels_gives_the_same_scores(name):
    """The op contract: q/k channels reordered by half_rotation_order and rotated in the half
    layout give exactly the attention scores of the model's own layout (interleaved for EVA-02
    and RoPE-Mixed, whose tables are per head)."""
    kwargs, _ = {**NAMED, **FAMILY}[name]
    spec, state = from_timm(randomized(name, **kwargs))
    freqs = state.get("blocks.0.attn.rope_freqs")
    heads = 1 if freqs is None else freqs.shape[1]
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, heads, spec.num_patches, spec.rope.dim, generator=gen, dtype=torch.float64)
            for _ in range(2))
    own = rope_tables(spec, layout="spec", dtype=torch.float64, freqs=freqs)
    half = rope_tables(spec, layout="half", dtype=torch.float64, freqs=freqs)
    order = half_rotation_order(spec)
    scores = apply_rope(q, *own, spec.rope.rotate_half) @ apply_rope(k, *own, spec.rope.rotate_half).mT
    permuted = apply_rope(q[..., order], *half, True) @ apply_rope(k[..., order], *half, True).mT
    torch.testing.assert_close(permuted, scores, rtol=1e-12, atol=1e-12)
    assert torch.equal(order.sort().values, torch.arange(spec.rope.dim))
