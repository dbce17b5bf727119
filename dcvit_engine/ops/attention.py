"""The fused attention block with pruned heads and channels,
    out = x + gamma * proj(MHA(LayerNorm(x))).

Head h of the kept heads attends with softmax(scale * q_h k_h^T + key_bias[b]) v_h, q_h and
k_h of width qk_dims[h], v_h of width v_dims[h] (the spec's AttentionSpec; scale is the
teacher's, kept after channel pruning). timm's EvaAttention parts are optional arguments,
computed by every backend: q/k-norm (`qk_norm=True`: a LayerNorm on each head's q and k),
rotary position embedding on q and k after it (`rope_cos`, `rope_sin`, `rope_index`; the
contract is in kernels/head_norm_rope.py) and the inner LayerNorm over the concatenated
context before proj (`attn.norm`: `inner_norm_weight`, `inner_norm_bias`). Backends: torch
(kernels.attention.attention_block_ref), cpu and cuda (torch.ops.dcvit.attention_block from
dcvit_engine._C), triton (kernels.attention.attention_block_triton; see ops/define.py).
"""
import inspect
import math
import operator

import torch

from dcvit_engine.kernels.attention import (
    attention_block_key_mean_ref,
    attention_block_key_mean_triton,
    attention_block_ref,
    attention_block_triton,
    flash_attention_why_not,
    key_mean_width,
)
from dcvit_engine.kernels.fused_linear import FoldedNorm
from dcvit_engine.ops.checks import check_folded, check_like_x
from dcvit_engine.ops.define import OpDef, define_op


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


def pair_tensors(name, pair) -> tuple:
    """(weight, bias) of a LayerNorm pair, (None, None) for None; ValueError for anything else."""
    if pair is None:
        return None, None
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or pair[0] is None or pair[1] is None:
        raise ValueError(f"attention_block: {name} must be a (weight, bias) pair of LayerNorm "
                         f"tensors, got {type(pair).__name__}")
    return tuple(pair)


def _check_pair(name, pair, shape, expected):
    """A (weight, bias) LayerNorm pair or None; adds its tensors to `expected` for
    check_like_x."""
    if pair is None:
        return
    for part, tensor in zip(("weight", "bias"), pair_tensors(name, pair)):
        expected[f"{name} {part}"] = (tensor, shape)


def check_rope(x, qk_dims, rope_cos, rope_sin, rope_index):
    """RoPE's tables and index (see kernels/head_norm_rope.py); ValueError naming what to fix."""
    if rope_cos is None and rope_sin is None:
        if rope_index is not None:
            raise ValueError("attention_block: rope_index without rope_cos/rope_sin; pass the tables too")
        return
    if rope_cos is None or rope_sin is None:
        raise ValueError("attention_block: pass both rope_cos and rope_sin (RoPE) or neither")
    odd = [d for d in qk_dims if d % 2]
    if odd:
        raise ValueError(f"attention_block: RoPE rotates channel pairs (i, i + d/2) of each head, so "
                         f"every q/k width must be even, got qk_dims={qk_dims}")
    batch, tokens, _ = x.shape
    for name, table in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
        if table.dim() != 2 or table.shape[1] != sum(qk_dims) or table.dtype != torch.float32:
            raise ValueError(f"attention_block: {name} must be a float32 table (positions, "
                             f"sum(qk_dims)={sum(qk_dims)}), got {tuple(table.shape)} {table.dtype}")
        if table.device != x.device:
            raise ValueError(f"attention_block: {name} is on {table.device} but x is on {x.device}; "
                             "move it there")
    if rope_cos.shape != rope_sin.shape:
        raise ValueError(f"attention_block: rope_cos {tuple(rope_cos.shape)} and rope_sin "
                         f"{tuple(rope_sin.shape)} must have one shape")
    positions = rope_cos.shape[0]
    if rope_index is None:
        if positions != tokens:
            raise ValueError(f"attention_block: without rope_index token t uses table row t, so the "
                             f"tables need N={tokens} rows, got {positions}; pass rope_index (B, N)")
        return
    if tuple(rope_index.shape) != (batch, tokens) or rope_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"attention_block: rope_index must be an int32/int64 (B={batch}, N={tokens}) "
                         f"tensor, got {tuple(rope_index.shape)} {rope_index.dtype}")
    if rope_index.device != x.device:
        raise ValueError(f"attention_block: rope_index is on {rope_index.device} but x is on "
                         f"{x.device}; move it there")
    # The values are checked where that costs no device sync (CPU tensors, eager).
    if rope_index.device.type == "cpu" and not torch.compiler.is_compiling() and rope_index.numel():
        low, high = int(rope_index.min()), int(rope_index.max())
        if low < 0 or high >= positions:
            raise ValueError(f"attention_block: rope_index must index the tables' {positions} rows, "
                             f"got values in [{low}, {high}]")


def check_attention_block_args(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight,
                               proj_bias, qk_dims, v_dims, scale, gamma, key_bias, q_norm=None,
                               k_norm=None, rope=(None, None, None), inner_norm=None):
    """Raises ValueError naming the argument whose shape, dtype, device or value is off;
    returns the widths as int lists. q_norm, k_norm, inner_norm: (weight, bias) or None;
    rope: (cos, sin, index)."""
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
    if q_norm is not None and len(set(qk_dims)) != 1:
        raise ValueError(f"attention_block: q_norm/k_norm need heads of one q/k width (timm's "
                         f"per-head LayerNorm), got qk_dims={qk_dims}")
    _check_pair("q_norm", q_norm, (qk_dims[0],), expected)
    _check_pair("k_norm", k_norm, (qk_dims[0],), expected)
    _check_pair("inner_norm", inner_norm, (v_total,), expected)
    check_like_x("attention_block", x, expected)
    check_rope(x, qk_dims, *rope)
    return qk_dims, v_dims


def _fake(x, *args):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _triton_why_not(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias,
                    qk_dims, v_dims, *rest, **options):
    return flash_attention_why_not(qk_dims, v_dims)


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


def _example_eva(generator):
    """dcvit doctor's EvaAttention case: one q/k width (q/k-norm), RoPE rows picked by an index
    (a prefix row of cos 1 / sin 0 first), the inner norm; widths off 16 (padded by Triton)."""
    (x, norm_w, norm_b, _, _, _, proj_b, _, _, scale, eps, gamma, key_bias), _ = _example(generator)
    batch, tokens, dim = x.shape
    heads, width, v_width = 3, 10, 7

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale

    qk, v = [width] * heads, [v_width] * heads
    rows = 2 * sum(qk) + sum(v)
    angles = rnd(tokens, sum(qk), scale=2.0).float()
    angles[0] = 0.0
    index = torch.randint(1, tokens, (batch, tokens), generator=generator)
    index[:, 0] = 0  # the class token: the identity row
    norms = [1 + rnd(n, scale=0.2) for n in (width, width, sum(v))]
    return (x, norm_w, norm_b, rnd(rows, dim, scale=dim**-0.5), rnd(rows, scale=0.1),
            rnd(dim, sum(v), scale=sum(v)**-0.5), proj_b, qk, v, scale, eps, gamma, key_bias,
            norms[0], rnd(width, scale=0.1), norms[1], rnd(width, scale=0.1), angles.cos(), angles.sin(),
            index, norms[2], rnd(sum(v), scale=0.1)), {}


def _public(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias,
            qk_dims, v_dims, scale, *, eps=1e-6, gamma=None, key_bias=None, q_norm=None,
            k_norm=None, rope_cos=None, rope_sin=None, rope_index=None, inner_norm_weight=None,
            inner_norm_bias=None):
    """x + gamma * proj(InnerNorm(MHA(LayerNorm(x)))) for x (B, N, D) with pruned heads and
    channels.

    qkv_weight (2*sum(qk_dims)+sum(v_dims), D) packed [q_0|q_1|..|k_0|k_1|..|v_0|v_1|..];
    qkv_bias of that length or None; head h attends with
    softmax(scale * q_h k_h^T + key_bias[b, None, :]) v_h, q_h/k_h of width qk_dims[h] and v_h
    of width v_dims[h]; proj_weight (D, sum(v_dims)), proj_bias (D,) or None; gamma LayerScale
    (D,) or None; key_bias (B, N) additive per-key bias (ToMe's proportional attention:
    log of each token's size) or None. q_norm, k_norm: timm's qk_norm, (weight, bias) of the
    LayerNorm applied to every head's q and k (heads of one width; eps as the block's), or
    None. rope_cos, rope_sin: float32 (P, sum(qk_dims)) RoPE tables in the packed q channel
    layout, rope_index (B, N) int32/int64 the row of each token (None: row t for token t, P ==
    N), applied to q and k after q/k-norm (kernels/head_norm_rope.py; even q/k widths).
    inner_norm_weight, inner_norm_bias: timm's `attn.norm`, a LayerNorm over the concatenated
    context (sum(v_dims),) before proj, or None. `backend` in {torch, cpu, cuda, triton}
    forces one implementation (else DCVIT_BACKEND, else the device's priority list).
    `qkv_folded`: kernels.fused_linear.fold_layer_norm(norm_weight, norm_bias, qkv_weight,
    qkv_bias), made once (the engine does at build time) for the Triton impl; without it
    Triton folds per call. The Triton impl takes heads up to 128 wide; it is fastest when
    every width is a multiple of 16 (build_engine pads heads so once; the Triton impl pads
    other widths per call, see kernels/head_padding.py). With q/k-norm, RoPE or the inner
    norm pass the real widths (their norms and channel pairs are the real channels'): the
    Triton impl pads those per call and keeps the padding out of them.
    """
    q_pair, k_pair = pair_tensors("q_norm", q_norm), pair_tensors("k_norm", k_norm)
    qk_dims, v_dims = head_widths(qk_dims, v_dims)
    # a scale that is not a number reaches the check as it is, which names it
    scale = float(scale) if isinstance(scale, (int, float)) else scale
    return (x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias, qk_dims, v_dims,
            scale, float(eps), gamma, key_bias, *q_pair, *k_pair, rope_cos, rope_sin,
            rope_index, inner_norm_weight, inner_norm_bias)


def _pair(weight, bias):
    return None if weight is None and bias is None else (weight, bias)


def _check(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias, qk_dims, v_dims,
           scale, eps, gamma, key_bias, q_norm_weight=None, q_norm_bias=None, k_norm_weight=None,
           k_norm_bias=None, rope_cos=None, rope_sin=None, rope_index=None, inner_norm_weight=None,
           inner_norm_bias=None, qkv_folded=None):
    check_attention_block_args(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias,
                               qk_dims, v_dims, scale, gamma, key_bias, _pair(q_norm_weight, q_norm_bias),
                               _pair(k_norm_weight, k_norm_bias), (rope_cos, rope_sin, rope_index),
                               _pair(inner_norm_weight, inner_norm_bias))
    if qkv_folded is not None:
        check_folded(qkv_folded, qkv_weight, x, name="qkv_folded")


_ARGUMENTS = ("(Tensor x, Tensor norm_weight, Tensor norm_bias, Tensor qkv_weight, Tensor? qkv_bias, "
           "Tensor proj_weight, Tensor? proj_bias, int[] qk_dims, int[] v_dims, float scale, "
           "float eps, Tensor? gamma, Tensor? key_bias, Tensor? q_norm_weight=None, "
           "Tensor? q_norm_bias=None, Tensor? k_norm_weight=None, Tensor? k_norm_bias=None, "
           "Tensor? rope_cos=None, Tensor? rope_sin=None, Tensor? rope_index=None, "
           "Tensor? inner_norm_weight=None, Tensor? inner_norm_bias=None)")
# fold_layer_norm's result for qkv, all three or none (see attention_block)
_FOLDED = {"qkv_folded": (FoldedNorm, "Tensor? qkv_folded_weight=None, "
                                      "Tensor? qkv_folded_bias=None, Tensor? qkv_weight_sums=None")}

ATTENTION_BLOCK = define_op(OpDef(
    name="attention_block",
    schema=_ARGUMENTS + " -> Tensor",
    backends=("torch", "cpu", "cuda", "triton"),
    reference=attention_block_ref,
    fake=_fake,
    triton=attention_block_triton,
    check=_check,
    public=_public,
    triton_options=_FOLDED,
    why_not={"triton": _triton_why_not},
    gemm=True,
    example=_example,
    variants={"eva": _example_eva},
))
OP = ATTENTION_BLOCK.name
attention_block = ATTENTION_BLOCK.function
attention_block_backends = ATTENTION_BLOCK.backends_function


def _key_mean_fake(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias, qk_dims,
                   *rest):
    return _fake(x), x.new_empty((x.shape[0], x.shape[1], key_mean_width(qk_dims)))


def _key_mean_check(*args, **options):
    _check(*args, **options)
    rope_cos = args[17] if len(args) > 17 else options.get("rope_cos")  # positional or keyword
    if rope_cos is not None:
        raise ValueError("attention_block_key_mean: RoPE is refused (the merge metric is taken "
                         "before RoPE, and merges and RoPE do not meet); call attention_block")


def _key_mean_public(*args, **kwargs):
    """attention_block's output and ToMe's merge metric from the keys the block computes, as
    (out, key_mean): the keys after q/k-norm averaged over heads, (B, N, qk_dims[0]), when
    every head has one q/k width, else the heads' keys side by side, (B, N, sum(qk_dims))
    (reference.merge_metric's form). Arguments as attention_block's; RoPE is refused (merges
    and RoPE do not meet). One op call where the metric used to cost a second LayerNorm and
    K projection."""
    return _public(*args, **kwargs)


_key_mean_public.__signature__ = inspect.signature(_public)


def _example_qk_norm(generator):
    """attention_block_key_mean with q/k-norm (one q/k width, averaged over heads), no RoPE."""
    args, options = _example_eva(generator)
    return (*args[:17], None, None, None, *args[20:]), options


ATTENTION_BLOCK_KEY_MEAN = define_op(OpDef(
    name="attention_block_key_mean",
    schema=_ARGUMENTS + " -> (Tensor, Tensor)",
    backends=("torch", "cpu", "cuda", "triton"),
    reference=attention_block_key_mean_ref,
    fake=_key_mean_fake,
    triton=attention_block_key_mean_triton,
    check=_key_mean_check,
    public=_key_mean_public,
    triton_options=_FOLDED,
    why_not={"triton": _triton_why_not},
    gemm=True,
    example=_example,
    variants={"qk_norm": _example_qk_norm},
))
attention_block_key_mean = ATTENTION_BLOCK_KEY_MEAN.function
attention_block_key_mean_backends = ATTENTION_BLOCK_KEY_MEAN.backends_function
