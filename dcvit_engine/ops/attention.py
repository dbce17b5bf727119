"""The fused attention block with pruned heads and channels,
    out = x + gamma * proj(MHA(LayerNorm(x))).

Head h of the kept heads attends with softmax(scale * q_h k_h^T + key_bias[b]) v_h, q_h and
k_h of width qk_dims[h], v_h of width v_dims[h] (the spec's AttentionSpec; scale is the
teacher's, kept after channel pruning). timm's q/k-norm (`qk_norm=True`: a LayerNorm on each
head's q and k) is an option of the op that only the torch backend computes so far; the
others refuse it with that reason. Backends: torch (kernels.attention.attention_block_ref),
cpu and cuda (torch.ops.dcvit.attention_block from dcvit_engine._C), triton
(kernels.attention.attention_block_triton; see ops/define.py).
"""
import math
import operator

import torch

from dcvit_engine.kernels.attention import (
    attention_block_ref,
    attention_block_triton,
    flash_attention_why_not,
)
from dcvit_engine.kernels.fused_linear import FoldedNorm
from dcvit_engine.ops.checks import check_like_x
from dcvit_engine.ops.define import OpDef, define_op
from dcvit_engine.ops.mlp_block import check_folded


def head_widths(qk_dims, v_dims) -> tuple[list[int], list[int]]:
    """The per-head widths as int lists; ValueError when they are not one positive int per
    kept head in each list."""
    widths = []
    for name, dims in (("qk_dims", qk_dims), ("v_dims", v_dims)):
        try:
            ints = [operator.index(d) for d in dims]
        except TypeError:
            raise ValueError(f"attention_block: {name} must be a list of ints (one width per kept "
                             f"head), got {dims!r}") from None
        if any(d < 1 for d in ints):
            raise ValueError(f"attention_block: every width in {name} must be >= 1, got {ints}")
        widths.append(ints)
    qk, v = widths
    if not qk or len(qk) != len(v):
        raise ValueError(f"attention_block: qk_dims and v_dims must list the same number (>= 1) of "
                         f"heads, got {len(qk)} and {len(v)}")
    return qk, v


def check_attention_block_args(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight,
                               proj_bias, qk_dims, v_dims, scale, gamma, key_bias, q_norm=None,
                               k_norm=None):
    """Raises ValueError naming the argument whose shape, dtype, device or value is off;
    returns the widths as int lists."""
    if x.dim() != 3:
        raise ValueError(f"attention_block: x must be (B, N, D), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"attention_block: x must be a floating-point tensor, got {x.dtype}")
    qk_dims, v_dims = head_widths(qk_dims, v_dims)
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"attention_block: scale must be a positive finite float (the teacher's "
                         f"head_dim ** -0.5), got {scale!r}")
    batch, tokens, dim = x.shape
    qk_total, v_total = sum(qk_dims), sum(v_dims)
    qkv_rows = 2 * qk_total + v_total
    if tuple(qkv_weight.shape) != (qkv_rows, dim):
        raise ValueError(
            f"attention_block: qkv_weight must be (2*sum(qk_dims)+sum(v_dims)={qkv_rows}, D={dim}) "
            f"for qk_dims={list(qk_dims)}, v_dims={list(v_dims)}, got {tuple(qkv_weight.shape)}; "
            "the widths must describe the packed [q heads | k heads | v heads] rows")
    expected = {
        "norm_weight": (norm_weight, (dim,)),
        "qkv_weight": (qkv_weight, None),
        "norm_bias": (norm_bias, (dim,)),
        "qkv_bias": (qkv_bias, (qkv_rows,)),
        "proj_weight": (proj_weight, (dim, v_total)),
        "proj_bias": (proj_bias, (dim,)),
        "gamma": (gamma, (dim,)),
        "key_bias": (key_bias, (batch, tokens)),
    }
    if (q_norm is None) != (k_norm is None):
        raise ValueError("attention_block: pass both q_norm and k_norm (timm's qk_norm=True) or neither")
    if q_norm is not None:
        if len(set(qk_dims)) != 1:
            raise ValueError(f"attention_block: q_norm/k_norm need heads of one q/k width (timm's "
                             f"per-head LayerNorm), got qk_dims={qk_dims}")
        for norm_name, pair in (("q_norm", q_norm), ("k_norm", k_norm)):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"attention_block: {norm_name} must be a (weight, bias) pair of "
                                 f"LayerNorm tensors, got {type(pair).__name__}")
            for part, tensor in zip(("weight", "bias"), pair):
                expected[f"{norm_name} {part}"] = (tensor, (qk_dims[0],))
    check_like_x("attention_block", x, expected)
    return qk_dims, v_dims


def _fake(x, *args):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_QK_NORM_REFUSAL = "q/k-norm (timm qk_norm=True) is computed by the torch backend only so far"


def _qk_norm_why_not(*args, q_norm=None, **options):
    return _QK_NORM_REFUSAL if q_norm is not None else None


def _triton_why_not(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias,
                    qk_dims, v_dims, *rest, q_norm=None, **options):
    return _qk_norm_why_not(q_norm=q_norm) or flash_attention_why_not(qk_dims, v_dims)


def _example(generator):
    """Small odd-shaped float64 inputs (dcvit doctor): ragged heads and a key bias."""
    batch, tokens, dim, qk_dims, v_dims = 2, 37, 40, [16, 5, 12], [16, 3, 9]

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale

    rows = 2 * sum(qk_dims) + sum(v_dims)
    weights = (1 + rnd(dim, scale=0.2), rnd(dim, scale=0.1), rnd(rows, dim, scale=dim**-0.5),
               rnd(rows, scale=0.1), rnd(dim, sum(v_dims), scale=sum(v_dims)**-0.5), rnd(dim, scale=0.1))
    key_bias = torch.rand(batch, tokens, generator=generator, dtype=torch.float64).log1p()
    return (rnd(batch, tokens, dim), *weights, qk_dims, v_dims, 0.25, 1e-6, rnd(dim).abs() + 0.1,
            key_bias), {}


ATTENTION_BLOCK = define_op(OpDef(
    name="attention_block",
    schema="(Tensor x, Tensor norm_weight, Tensor norm_bias, Tensor qkv_weight, Tensor? qkv_bias, "
           "Tensor proj_weight, Tensor? proj_bias, int[] qk_dims, int[] v_dims, float scale, "
           "float eps, Tensor? gamma, Tensor? key_bias) -> Tensor",
    reference=attention_block_ref,
    reference_options=("q_norm", "k_norm"),
    fake=_fake,
    triton=attention_block_triton,
    # fold_layer_norm's result for qkv, all three or none (see attention_block)
    triton_options={"qkv_folded": (FoldedNorm, "Tensor? qkv_folded_weight=None, "
                                               "Tensor? qkv_folded_bias=None, Tensor? qkv_weight_sums=None")},
    why_not={"cpu": _qk_norm_why_not, "cuda": _qk_norm_why_not, "triton": _triton_why_not},
    gemm=True,
    example=_example,
))
OP = ATTENTION_BLOCK.name


def attention_block(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias,
                    qk_dims, v_dims, scale, *, eps=1e-6, gamma=None, key_bias=None, q_norm=None,
                    k_norm=None, backend=None, qkv_folded: FoldedNorm | None = None):
    """x + gamma * proj(MHA(LayerNorm(x))) for x (B, N, D) with pruned heads and channels.

    qkv_weight (2*sum(qk_dims)+sum(v_dims), D) packed [q_0|q_1|..|k_0|k_1|..|v_0|v_1|..];
    qkv_bias of that length or None; head h attends with
    softmax(scale * q_h k_h^T + key_bias[b, None, :]) v_h, q_h/k_h of width qk_dims[h] and v_h
    of width v_dims[h]; proj_weight (D, sum(v_dims)), proj_bias (D,) or None; gamma LayerScale
    (D,) or None; key_bias (B, N) additive per-key bias (ToMe's proportional attention:
    log of each token's size) or None. q_norm, k_norm: timm's qk_norm, (weight, bias) of the
    LayerNorm applied to every head's q and k (heads of one width; eps as the block's), or
    None; only the torch backend computes them so far. `backend` in {torch, cpu, cuda,
    triton} forces one implementation (else DCVIT_BACKEND, else the device's priority list).
    `qkv_folded`: kernels.fused_linear.fold_layer_norm(norm_weight, norm_bias, qkv_weight,
    qkv_bias), made once (the engine does at build time) for the Triton impl; without it
    Triton folds per call. The Triton impl takes heads up to 128 wide; it is fastest when
    every width is a multiple of 16 (build_engine pads heads so once; the Triton impl pads
    other widths per call, see kernels/head_padding.py).
    """
    qk_dims, v_dims = check_attention_block_args(x, norm_weight, norm_bias, qkv_weight, qkv_bias,
                                                 proj_weight, proj_bias, qk_dims, v_dims, scale,
                                                 gamma, key_bias, q_norm, k_norm)
    if qkv_folded is not None:
        check_folded(qkv_folded, qkv_weight, x, name="qkv_folded")
    return ATTENTION_BLOCK(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias,
                           qk_dims, v_dims, float(scale), float(eps), gamma, key_bias, backend=backend,
                           q_norm=q_norm, k_norm=k_norm, qkv_folded=qkv_folded)


def attention_block_backends(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight,
                             proj_bias, qk_dims, v_dims, scale, *, eps=1e-6, gamma=None,
                             key_bias=None, q_norm=None, k_norm=None) -> dict[str, str | None]:
    """Each backend's reason for refusing these inputs (None: available)."""
    qk_dims, v_dims = head_widths(qk_dims, v_dims)
    return ATTENTION_BLOCK.reasons(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight,
                                   proj_bias, qk_dims, v_dims, float(scale), float(eps), gamma,
                                   key_bias, q_norm=q_norm, k_norm=k_norm)
