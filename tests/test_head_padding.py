"""Head padding (kernels/head_padding.py): exact in float64, invisible outside the engine and the op."""
import torch

from dcvit_engine.engine import build_engine
from dcvit_engine.kernels.attention import attention_block_ref
from dcvit_engine.kernels.head_padding import pad_head_weights, pad_heads, padded_width
from dcvit_engine.reference import ViTReference
from dcvit_engine.spec import AttentionSpec, BlockSpec, ViTSpec

QK, V = [64, 17, 40, 1], [64, 5, 33, 16]  # UVC-like: every head its own widths


def test_padded_widths_are_multiples_of_16():
    assert [padded_width(w) for w in (1, 15, 16, 17, 33, 40, 64)] == [16, 16, 16, 32, 48, 48, 64]


def test_padding_is_exact_in_float64():
    f64 = dict(dtype=torch.float64)
    dim, rows = 40, 2 * sum(QK) + sum(V)
    x = torch.randn(2, 37, dim, **f64)
    norm = [1 + 0.2 * torch.randn(dim, **f64), 0.1 * torch.randn(dim, **f64)]
    qkv_w, qkv_b = torch.randn(rows, dim, **f64) / dim**0.5, 0.1 * torch.randn(rows, **f64)
    proj_w, proj_b = torch.randn(dim, sum(V), **f64) / sum(V)**0.5, 0.1 * torch.randn(dim, **f64)
    key_bias = torch.rand(2, 37, **f64)
    padded = pad_heads(QK, V, qkv_w, qkv_b, proj_w)
    assert padded.qk_dims == [64, 32, 48, 16] and padded.v_dims == [64, 16, 48, 16]
    expected = attention_block_ref(x, *norm, qkv_w, qkv_b, proj_w, proj_b, QK, V, 0.2, key_bias=key_bias)
    got = attention_block_ref(x, *norm, padded.qkv_weight, padded.qkv_bias, padded.proj_weight, proj_b,
                              padded.qk_dims, padded.v_dims, 0.2, key_bias=key_bias)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # the per-call padding (device ops only) gives the same weights
    qk_p, v_p, w_p, b_p, proj_p = pad_head_weights(QK, V, qkv_w, qkv_b, proj_w)
    assert (qk_p, v_p) == (padded.qk_dims, padded.v_dims)
    assert torch.equal(w_p, padded.qkv_weight) and torch.equal(b_p, padded.qkv_bias)
    assert torch.equal(proj_p, padded.proj_weight)
    assert pad_head_weights(QK, V, qkv_w, None, proj_w)[3] is None


def test_engine_pads_heads_but_shows_real_widths():
    spec = ViTSpec(img_size=(32, 32), patch_size=8, in_chans=3, embed_dim=48, num_classes=5,
                   class_token=True, dist_token=False, global_pool="token", fc_norm=False,
                   pre_norm=False, final_norm=True, no_embed_class=False, norm_eps=1e-6,
                   prop_attn=False,
                   blocks=[BlockSpec(attn=AttentionSpec(qk_dims=QK, v_dims=V, scale=0.125), mlp_hidden=0),
                           BlockSpec(attn=AttentionSpec(qk_dims=[16] * 3, v_dims=[16] * 3, scale=0.25),
                                     mlp_hidden=0)]).validate()
    reference = ViTReference(spec).eval()
    engine = build_engine(reference, backend="torch")
    ragged, dense = engine.blocks
    assert ragged.kernel_qk_dims == [64, 32, 48, 16] and ragged.kernel_v_dims == [64, 16, 48, 16]
    assert ragged.qk_dims == QK and ragged.v_dims == V and str(QK) in ragged.extra_repr()
    assert engine.spec.blocks[0].attn.qk_dims == QK
    assert ragged.qkv_weight.shape[0] == 2 * (64 + 32 + 48 + 16) + (64 + 16 + 48 + 16)
    assert dense.kernel_qk_dims == [16] * 3 and dense.qkv_weight.shape[0] == 3 * 48  # nothing to pad
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(engine(images), reference(images), rtol=1e-4, atol=1e-4)
