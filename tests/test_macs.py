import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from dcvit_engine.macs import attention_macs, block_macs, count_macs, mlp_macs
from dcvit_engine.reference import ViTReference, reference_from_timm
from dcvit_engine.spec import AttentionSpec, AttnPoolSpec, BlockSpec, MergeSpec, RopeSpec, ViTSpec


def make_spec(blocks, **overrides) -> ViTSpec:
    fields = dict(img_size=(24, 40), patch_size=8, in_chans=3, embed_dim=24, num_classes=7,
                  class_token=True, dist_token=False, global_pool="token", fc_norm=False,
                  pre_norm=False, final_norm=True, no_embed_class=False, norm_eps=1e-6,
                  prop_attn=False)
    fields.update(overrides)
    return ViTSpec(blocks=blocks, **fields).validate()


def full_blocks(depth=3, heads=3, head_dim=8, hidden=96, **attn_kw):
    return [BlockSpec(AttentionSpec([head_dim] * heads, [head_dim] * heads, head_dim ** -0.5,
                                    **attn_kw), hidden) for _ in range(depth)]


def pruned_blocks():
    return [
        BlockSpec(AttentionSpec([16, 5, 11], [16, 7, 3], 0.25), 37, layer_scale=True),
        BlockSpec(None, 50),
        BlockSpec(AttentionSpec([8, 8], [3, 8], 8 ** -0.5, qkv_bias=False, proj_bias=False,
                                qk_norm=True), 0),
        BlockSpec(None, 0),
        BlockSpec(AttentionSpec([3], [5], 0.25), 13),
    ]


def gated_blocks():
    """EVA-02 / DINOv3-like blocks: SwiGLU with the inner norm, attention inner norm, whole heads."""
    return [BlockSpec(AttentionSpec([8] * 3, [8, 3, 8], 8 ** -0.5, inner_norm=True), 40, layer_scale=True,
                      mlp_act="silu", mlp_gated=True, mlp_inner_norm=True),
            BlockSpec(AttentionSpec([8] * 3, [8] * 3, 8 ** -0.5), 24, mlp_act="gelu_tanh")]


SPECS = {
    "full": lambda: make_spec(full_blocks()),
    "pruned": lambda: make_spec(pruned_blocks()),
    "distilled": lambda: make_spec(pruned_blocks(), dist_token=True),
    "avg_fc_norm_pre_norm": lambda: make_spec(full_blocks(), class_token=False, global_pool="avg",
                                              fc_norm=True, final_norm=False, pre_norm=True),
    "no_pool_no_embed_class": lambda: make_spec(pruned_blocks(), global_pool="", no_embed_class=True),
    "no_head_odd_size": lambda: make_spec(full_blocks(2, 4, 5, 33), num_classes=0, img_size=(33, 17),
                                          in_chans=2),
    "gated_rope_registers": lambda: make_spec(gated_blocks(), reg_tokens=2, abs_pos_embed=False,
                                              rope=RopeSpec("cat", 8, 10000.0, rotate_half=False)),
    "attention_pool": lambda: make_spec(pruned_blocks(), class_token=False, global_pool="map",
                                        attn_pool=AttnPoolSpec(num_heads=3, mlp_hidden=40)),
    "attention_pool_latents": lambda: make_spec(
        full_blocks(), reg_tokens=1, global_pool="map", attn_pool=AttnPoolSpec(
            num_heads=2, mlp_hidden=17, latent_len=3, qk_norm=True, include_prefix=True, pool="")),
}


class _MacsByWeight(TorchFunctionMode):
    """Counts each F.linear / F.conv2d call's MACs (per image) under the name of the module
    that owns its weight. Keyed by the weight rather than by module hooks because the
    reference calls some Linear weights functionally (the head, through `classify`)."""

    def __init__(self, model: nn.Module, batch: int):
        super().__init__()
        self.owner = {id(m.weight): n for n, m in model.named_modules()
                      if isinstance(m, (nn.Linear, nn.Conv2d))}
        self.batch, self.per_module = batch, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (F.linear, F.conv2d):
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            name = self.owner.get(id(weight))
            if name is not None:
                # linear: rows x in x out; conv: each output element costs in/groups x kh x kw
                macs = (x.numel() // weight.shape[1] * weight.shape[1] * weight.shape[0]
                        if func is F.linear else out.numel() * weight[0].numel())
                self.per_module[name] = self.per_module.get(name, 0) + macs // self.batch
        return out


def _cpu_sdpa_flops(query, key, value, *args, out_val=None, **kwargs):
    return sdpa_flop_count(query, key, value)  # shapes: the counter passes shapes


def hook_count(model: ViTReference, x: torch.Tensor):
    """MACs per image measured on the module: every Linear / Conv2d weight's use (_MacsByWeight),
    and torch's FlopCounterMode (which sees every matmul) for the two attention matmuls."""
    by_weight = _MacsByWeight(model, x.shape[0])
    # torch's counter has no formula for the CPU flash kernel that SDPA (the attention-pool
    # head) runs; its matmuls are the same two as the GPU kernels'
    cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter, by_weight:
        model(x)
    per_module = by_weight.per_module
    all_matmuls = counter.get_total_flops() // 2 // x.shape[0]
    return per_module, all_matmuls - sum(per_module.values())


@pytest.mark.parametrize("name", list(SPECS))
def test_analytic_count_equals_hook_count(name):
    spec = SPECS[name]()
    model = ViTReference(spec).eval()
    per_module, attention_matmuls = hook_count(model, torch.randn(2, spec.in_chans, *spec.img_size))
    report = count_macs(spec)
    assert report.total == sum(per_module.values()) + attention_matmuls
    assert report.attention_matmuls == attention_matmuls
    assert report.patch_embed == per_module["patch_embed.proj"]
    assert report.head == per_module.get("head", 0) + per_module.get("head_dist", 0)
    if report.attn_pool is not None:
        pool = report.attn_pool
        measured = tuple(per_module[f"attn_pool.{n}"] for n in ("q", "kv", "proj"))
        assert (pool.q, pool.kv, pool.proj) == measured
        assert pool.mlp == per_module["attn_pool.mlp.fc1"] + per_module["attn_pool.mlp.fc2"]
    for i, b in enumerate(report.blocks):
        pre = f"blocks.{i}."
        assert b.qkv == per_module.get(pre + "attn.qkv", 0)
        assert b.proj == per_module.get(pre + "attn.proj", 0)
        assert b.fc1 == per_module.get(pre + "mlp.fc1", 0)
        assert b.fc2 == per_module.get(pre + "mlp.fc2", 0)


def test_deit_base_is_17_6_gmacs():
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = timm.create_model("deit_base_patch16_224", pretrained=False)
    report = count_macs(model)
    assert report.total == 17_563_828_224
    assert abs(report.total - 17.56e9) / 17.56e9 < 1e-3
    block = report.blocks[0]
    n, d = 197, 768
    assert (block.tokens, block.attn, block.mlp) == (n, n * d * 3 * d + 2 * n * n * d + n * d * d,
                                                     2 * n * d * 4 * d)
    assert report.patch_embed == 196 * 768 * 768 and report.head == 768 * 1000
    # the thop view (Linear + Conv + LayerNorm, no attention matmuls)
    assert report.thop_style == report.total - 12 * 2 * 197 * 197 * 768 + report.layernorm


def test_count_macs_accepts_timm_reference_and_path(tmp_path):
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48,
                              depth=2, num_heads=3, num_classes=5, weight_init="skip")
    spec = reference_from_timm(model).spec
    (tmp_path / "spec.json").write_text(spec.to_json())
    expected = count_macs(spec)
    assert count_macs(model) == expected
    assert count_macs(ViTReference(spec)) == expected
    assert count_macs(tmp_path) == expected and count_macs(str(tmp_path / "spec.json")) == expected
    with pytest.raises(TypeError, match="count_macs expects"):
        count_macs(42)


def test_layernorm_reported_separately():
    spec = make_spec(pruned_blocks(), pre_norm=True)
    report = count_macs(spec)
    tokens, dim = 1 + 15, 24
    elements = (tokens * dim                     # norm_pre
                + tokens * dim * 3 + tokens * dim * 3  # norm1 of blocks 0, 2, 4; norm2 of 0, 1, 4
                + 2 * tokens * 16                # q_norm and k_norm of block 2
                + tokens * dim)                  # final norm
    assert report.layernorm == 4 * elements
    assert report.total == report.patch_embed + report.head + sum(b.total for b in report.blocks)


def test_block_helpers_give_a_and_f():
    spec = make_spec(full_blocks(hidden=96))
    b = block_macs(spec, 1)
    n, d = 16, 24
    assert b.attn == attention_macs(spec.blocks[1].attn, d, n) == n * d * 72 + 2 * n * n * 24 + n * 24 * d
    assert b.mlp == mlp_macs(d, 96, n) == 2 * n * d * 96
    assert block_macs(spec, 1, tokens=197).attn == attention_macs(spec.blocks[1].attn, d, 197)
    assert attention_macs(None, d, n) == 0
    with pytest.raises(IndexError):
        block_macs(spec, 3)


def test_merges_shrink_later_blocks():
    blocks = full_blocks(depth=4)
    blocks[0].merge = MergeSpec("tome", r=3)
    spec = make_spec(blocks, img_size=(40, 40))  # 1 + 25 tokens
    report = count_macs(spec)
    assert [(b.tokens, b.mlp_tokens) for b in report.blocks] == [(26, 23), (23, 23), (23, 23), (23, 23)]
    d, attn = 24, spec.blocks[0].attn
    assert report.blocks[0].attn == attention_macs(attn, d, 26)
    assert report.blocks[0].mlp == mlp_macs(d, 96, 23)
    with pytest.raises(ValueError, match="merges tokens"):
        block_macs(spec, 0, tokens=50)

    atme = full_blocks(depth=2)
    atme[0].merge = MergeSpec("atme", axis="w")
    report = count_macs(make_spec(atme, img_size=(40, 40), global_pool=""))  # 5x5 -> 5x3
    assert [(b.tokens, b.mlp_tokens) for b in report.blocks] == [(26, 16), (16, 16)]
    assert report.head == 16 * 24 * 7  # no pooling: the head sees every token


def test_gated_rope_register_family_by_hand():
    """EVA-02 / DINOv3 family: registers enter every matmul, a gated fc1 costs both halves,
    RoPE and the inner norms are reported apart."""
    spec = SPECS["gated_rope_registers"]()
    report = count_macs(spec)
    n, d, patches = 1 + 2 + 15, 24, 15  # class + 2 registers + the 3 x 5 grid
    b0, b1 = report.blocks
    assert b0.qkv == n * d * (24 + 24 + 19) and b0.qk == n * n * 24 and b0.av == n * n * 19
    assert b0.proj == n * 19 * d
    assert b0.fc1 == n * d * 2 * 40 and b0.fc2 == n * 40 * d  # gate and value halves
    assert b0.mlp == mlp_macs(d, 40, n, gated=True)
    assert b1.fc1 == n * d * 24 and b1.mlp == mlp_macs(d, 24, n)
    assert b0.rope == b1.rope == 2 * 2 * patches * 24  # q and k of the patch tokens only
    assert report.rope == b0.rope + b1.rope
    assert b0.layernorm == 4 * (n * d + n * 19 + n * d + n * 40)  # norm1, attn.norm, norm2, mlp.norm
    assert report.total == (patches * d * 3 * 64 + b0.total + b1.total + d * 7)


def test_attention_pool_head_by_hand():
    """SigLIP / PE family: the 'map' head's q, kv, QK^T, A.V, proj and MLP are in the total."""
    report = count_macs(SPECS["attention_pool"]())
    d, tokens = 24, 15  # no class token: the pool attends over the 15 patch tokens
    pool = report.attn_pool
    assert (pool.q, pool.kv, pool.qk, pool.av, pool.proj, pool.mlp) == (
        d * d, tokens * d * 2 * d, tokens * d, tokens * d, d * d, 2 * d * 40)
    assert report.head == d * 7
    assert report.total == report.patch_embed + sum(b.total for b in report.blocks) + pool.total + d * 7
    latents = count_macs(SPECS["attention_pool_latents"]())
    tokens = 1 + 1 + 15  # include_prefix: class and register token too
    assert latents.attn_pool.kv == tokens * d * 2 * d and latents.attn_pool.qk == 3 * tokens * d
    assert latents.head == 3 * d * 7  # pool "": the head sees each of the 3 latents


def test_named_families_count_from_timm():
    """count_macs of timm models of the new families equals the hand formula of their spec."""
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=2, img_size=56)
    report = count_macs(model)
    n, d, hidden = 1 + 16, 192, int(192 * 4 * 2 / 3)
    assert report.blocks[0].fc1 == n * d * 2 * hidden and report.blocks[0].fc2 == n * hidden * d
    assert report.blocks[0].rope == 2 * 2 * 16 * d
    siglip = count_macs(timm.create_model("vit_base_patch16_siglip_224", pretrained=False, depth=1,
                                          img_size=64))
    assert siglip.attn_pool.kv == 16 * 768 * 2 * 768 and siglip.attn_pool.mlp == 2 * 768 * 3072
