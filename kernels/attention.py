"""Fused attention block with pruned heads and channels:
    out = x + gamma * proj(MHA(LayerNorm(x)))

Head h attends with softmax(scale * q_h k_h^T + key_bias[b]) v_h, where q_h and k_h have
width qk_dims[h] and v_h width v_dims[h]; widths may differ per head (UVC prunes each head
separately) or be uniform (CAIT's CDCP). qkv rows are packed [q_0|q_1|..|k_0|k_1|..|v_0|..]
with each head's rows contiguous; the context heads are concatenated in head order.
key_bias (B, N) is ToMe's proportional attention (log of each key's token count).

Triton launches:
  1. `ln_linear` (fused_linear): the qkv GEMM with LayerNorm folded into its weights (row
     statistics pass + GEMM with the normalization and bias in the epilogue); writes the
     packed (B*N, 2*sum(qk)+sum(v)) qkv rows.
  2. `_flash_attention_kernel`: one launch for all heads, one program per (batch*head,
     q-block), online softmax over key blocks with fp32 statistics and accumulator. Its
     tiles are as wide as the widest head, rounded up to a multiple of 16 and split into at
     most two power-of-two parts (48 = 32 + 16). Three specializations: `UNIFORM` (every
     head exactly the tile's width: columns from the head index, no column masks), `ALIGNED`
     (widths and columns multiples of 16, as build_engine pads them: read from a per-head
     table, promised aligned with tl.multiple_of, so loads are 16-byte vectors and cp.async
     pipelines them), and the general table (any widths, masked per head; at sm_90 it
     spills, so `attention_block_triton` pads other widths to 16 first, see
     head_padding.py). So removing heads removes programs and narrowing every head shrinks
     the tiles.
  3. `_linear_residual_kernel` (fused_linear): proj GEMM with bias, LayerScale and the
     residual add in the epilogue.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .fused_linear import linear_residual, ln_linear
from .head_norm_rope import (
    cached_int_table,
    head_norm,
    inner_norm_,
    qk_norm_rope_,
    rope_rows,
    rotate_half_ref,
)
from .head_padding import HEAD_WIDTH_MULTIPLE, pad_head_weights
from .launching import dot_precision, dot_upcast, launch_directly

_LOG2E = 1.4426950408889634


def attention_context_ref(qkv, qk_dims, v_dims, scale, key_bias=None, q_norm=None, k_norm=None,
                          eps=1e-6, rope=None):
    """Plain-PyTorch attention core: packed qkv (B, N, 2*sum(qk)+sum(v)) -> (B, N, sum(v)),
    one head at a time. q_norm / k_norm: (weight, bias) of timm's per-head LayerNorm or None;
    rope: (cos, sin, index or None) (see head_norm_rope), applied after them, or None."""
    qk_total = sum(qk_dims)
    q, k, v = qkv.split([qk_total, qk_total, sum(v_dims)], dim=-1)
    if rope is not None:
        cos, sin = (rope_rows(t, rope[2], qkv.shape[1]).split(qk_dims, -1) for t in rope[:2])
    heads = []
    parts = zip(q.split(qk_dims, -1), k.split(qk_dims, -1), v.split(v_dims, -1))
    for h, (q_h, k_h, v_h) in enumerate(parts):
        q_h, k_h = head_norm(q_h, q_norm, eps), head_norm(k_h, k_norm, eps)
        if rope is not None:
            q_h = rotate_half_ref(q_h, cos[h], sin[h]).to(q_h.dtype)
            k_h = rotate_half_ref(k_h, cos[h], sin[h]).to(k_h.dtype)
        logits = (q_h @ k_h.transpose(-2, -1)) * scale
        if key_bias is not None:
            logits = logits + key_bias[:, None, :]
        heads.append(logits.softmax(dim=-1) @ v_h)
    return torch.cat(heads, dim=-1)


def _pair(weight, bias):
    return None if weight is None else (weight, bias)


def key_mean_ref(keys, qk_dims, k_norm=None, eps=1e-6):
    """ToMe's merge metric from the keys (..., N, sum(qk_dims)) before k_norm: the keys as
    attention uses them (after k_norm, a (weight, bias) pair or None; before RoPE) averaged
    over heads, (..., N, qk_dims[0]); heads of different widths cannot be averaged and are
    side by side instead, (..., N, sum(qk_dims))."""
    if len(set(qk_dims)) != 1:
        return torch.cat([head_norm(k, k_norm, eps) for k in keys.split(list(qk_dims), dim=-1)], dim=-1)
    return head_norm(keys.unflatten(-1, (len(qk_dims), qk_dims[0])), k_norm, eps).mean(dim=-2)


def key_mean_width(qk_dims) -> int:
    """The last dimension of key_mean_ref's result for these head widths."""
    return qk_dims[0] if len(set(qk_dims)) == 1 else sum(qk_dims)


def attention_block_key_mean_ref(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight,
                                 proj_bias, qk_dims, v_dims, scale, eps=1e-6, gamma=None, key_bias=None,
                                 q_norm_weight=None, q_norm_bias=None, k_norm_weight=None,
                                 k_norm_bias=None, rope_cos=None, rope_sin=None, rope_index=None,
                                 inner_norm_weight=None, inner_norm_bias=None):
    """(attention_block_ref's output, key_mean_ref of the block's keys): the op
    attention_block_key_mean (arguments in its schema order; RoPE is refused by its check)."""
    out = attention_block_ref(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias,
                              qk_dims, v_dims, scale, eps, gamma, key_bias, q_norm_weight, q_norm_bias,
                              k_norm_weight, k_norm_bias, rope_cos, rope_sin, rope_index,
                              inner_norm_weight, inner_norm_bias)
    h = torch.nn.functional.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    qk_total = sum(qk_dims)
    k_bias = None if qkv_bias is None else qkv_bias[qk_total:2 * qk_total]
    keys = torch.nn.functional.linear(h, qkv_weight[qk_total:2 * qk_total], k_bias)
    return out, key_mean_ref(keys, qk_dims, _pair(k_norm_weight, k_norm_bias), eps)


def attention_block_ref(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias,
                        qk_dims, v_dims, scale, eps=1e-6, gamma=None, key_bias=None,
                        q_norm_weight=None, q_norm_bias=None, k_norm_weight=None, k_norm_bias=None,
                        rope_cos=None, rope_sin=None, rope_index=None, inner_norm_weight=None,
                        inner_norm_bias=None):
    """Plain-PyTorch definition of the op (timm's Block / EvaBlock attention branch with its
    residual; arguments in the op's schema order): LayerNorm, qkv, per-head q/k-norm, RoPE,
    attention, the inner LayerNorm over the context, proj, LayerScale, residual."""
    h = torch.nn.functional.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    qkv = torch.nn.functional.linear(h, qkv_weight, qkv_bias)
    rope = None if rope_cos is None else (rope_cos, rope_sin, rope_index)
    ctx = attention_context_ref(qkv, qk_dims, v_dims, scale, key_bias,
                                _pair(q_norm_weight, q_norm_bias), _pair(k_norm_weight, k_norm_bias),
                                eps, rope)
    if inner_norm_weight is not None:
        ctx = torch.nn.functional.layer_norm(ctx, (ctx.shape[-1],), inner_norm_weight,
                                             inner_norm_bias, eps)
    y = torch.nn.functional.linear(ctx, proj_weight, proj_bias)
    return x + (y * gamma if gamma is not None else y)


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    if DOT_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _head_tile_mask(row_ok, cols, width, COLS_LAST: tl.constexpr, UNIFORM: tl.constexpr):
    # Which elements of one head's tile exist: rows by row_ok, columns (the head's `cols`) by
    # `width` -- except for UNIFORM heads, which fill the tile exactly (no column mask).
    # COLS_LAST: columns on the tile's last axis (q, v, ctx), else on its first (k^T).
    if COLS_LAST:
        if UNIFORM:
            mask = row_ok[:, None]
        else:
            mask = row_ok[:, None] & (cols < width)[None, :]
    else:
        if UNIFORM:
            mask = row_ok[None, :]
        else:
            mask = row_ok[None, :] & (cols < width)[:, None]
    return mask


@triton.jit
def _load_head_tile(ptrs, row_ok, cols, width, COLS_LAST: tl.constexpr, UNIFORM: tl.constexpr):
    return tl.load(ptrs, mask=_head_tile_mask(row_ok, cols, width, COLS_LAST, UNIFORM), other=0.0)


@triton.jit
def _flash_attention_kernel(
    qkv_ptr, table_ptr, key_bias_ptr, ctx_ptr,
    N, HEADS, qk_scale_log2,
    stride_qkv, stride_ctx, stride_key_bias,
    HAS_KEY_BIAS: tl.constexpr, UNIFORM: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DQK0: tl.constexpr, DQK1: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    # Head widths are tiled as two power-of-two parts (DQK0 + DQK1, DV0 + DV1; the second
    # part may be 0), so a 48-wide head costs 48 columns of tensor-core work, not 64.
    pid = tl.program_id(0).to(tl.int64)
    num_m = tl.cdiv(N, BLOCK_M)
    # q-blocks of one (batch, head) are adjacent, so they run together and share K/V in L2.
    pid_bh = pid // num_m
    pid_m = pid % num_m
    batch = pid_bh // HEADS
    head = pid_bh % HEADS
    if UNIFORM:
        # Every head exactly DQK0+DQK1 / DV0+DV1 wide: columns follow from the head index,
        # and their alignment is visible to the compiler (16-byte vector loads, cp.async).
        q_col = head * (DQK0 + DQK1)
        k_col = HEADS * (DQK0 + DQK1) + q_col
        v_col = 2 * HEADS * (DQK0 + DQK1) + head * (DV0 + DV1)
        out_col = head * (DV0 + DV1)
        qk_width = DQK0 + DQK1
        v_width = DV0 + DV1
    else:
        q_col = tl.load(table_ptr + 0 * HEADS + head).to(tl.int64)
        k_col = tl.load(table_ptr + 1 * HEADS + head).to(tl.int64)
        v_col = tl.load(table_ptr + 2 * HEADS + head).to(tl.int64)
        out_col = tl.load(table_ptr + 3 * HEADS + head).to(tl.int64)
        qk_width = tl.load(table_ptr + 4 * HEADS + head)
        v_width = tl.load(table_ptr + 5 * HEADS + head)
        if ALIGNED:
            # The host checked that every width and column is a multiple of 16 (the engine
            # pads heads so); without this promise every element is a scalar 2-byte load.
            q_col = tl.multiple_of(q_col, 16)
            k_col = tl.multiple_of(k_col, 16)
            v_col = tl.multiple_of(v_col, 16)
            out_col = tl.multiple_of(out_col, 16)
            qk_width = tl.multiple_of(qk_width, 16)
            v_width = tl.multiple_of(v_width, 16)

    first_row = batch * N
    queries = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    query_ok = queries < N
    q_rows = qkv_ptr + (first_row + queries)[:, None] * stride_qkv
    dq0 = tl.arange(0, DQK0)
    dv0 = tl.arange(0, DV0)
    # Column masks only where a head can be narrower than its tile (_head_tile_mask).
    q0 = _load_head_tile(q_rows + q_col + dq0[None, :], query_ok, dq0, qk_width, True, UNIFORM)
    if DQK1 > 0:
        dq1 = DQK0 + tl.arange(0, DQK1)
        q1 = _load_head_tile(q_rows + q_col + dq1[None, :], query_ok, dq1, qk_width, True, UNIFORM)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc0 = tl.zeros((BLOCK_M, DV0), dtype=tl.float32)
    if DV1 > 0:
        dv1 = DV0 + tl.arange(0, DV1)
        acc1 = tl.zeros((BLOCK_M, DV1), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < N
        kv_rows = qkv_ptr + (first_row + keys) * stride_qkv
        k0 = _load_head_tile(kv_rows[None, :] + k_col + dq0[:, None], key_ok, dq0, qk_width, False, UNIFORM)
        s = _mma(q0, k0, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_PRECISION, DOT_UPCAST)
        if DQK1 > 0:
            k1 = _load_head_tile(kv_rows[None, :] + k_col + dq1[:, None], key_ok, dq1, qk_width, False,
                                 UNIFORM)
            s = _mma(q1, k1, s, DOT_PRECISION, DOT_UPCAST)
        # Logits in log2 units: exp2 is the GPU's native exponential.
        s = s * qk_scale_log2
        if HAS_KEY_BIAS:
            kb = tl.load(key_bias_ptr + batch * stride_key_bias + keys, mask=key_ok, other=0.0)
            s = s + kb.to(tl.float32)[None, :] * 1.4426950408889634
        s = tl.where(key_ok[None, :], s, float("-inf"))
        # The first key block always holds a valid key, so m_new is finite from then on.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # Probabilities in the input precision for the tensor cores, as flash-attention.
        p = p.to(qkv_ptr.dtype.element_ty)
        v0 = _load_head_tile(kv_rows[:, None] + v_col + dv0[None, :], key_ok, dv0, v_width, True, UNIFORM)
        acc0 = _mma(p, v0, acc0 * alpha[:, None], DOT_PRECISION, DOT_UPCAST)
        if DV1 > 0:
            v1 = _load_head_tile(kv_rows[:, None] + v_col + dv1[None, :], key_ok, dv1, v_width, True,
                                 UNIFORM)
            acc1 = _mma(p, v1, acc1 * alpha[:, None], DOT_PRECISION, DOT_UPCAST)
        m_i = m_new

    out_rows = ctx_ptr + (first_row + queries)[:, None] * stride_ctx + out_col
    out_ty = ctx_ptr.dtype.element_ty
    tl.store(out_rows + dv0[None, :], (acc0 / l_i[:, None]).to(out_ty),
             mask=_head_tile_mask(query_ok, dv0, v_width, True, UNIFORM))
    if DV1 > 0:
        tl.store(out_rows + dv1[None, :], (acc1 / l_i[:, None]).to(out_ty),
                 mask=_head_tile_mask(query_ok, dv1, v_width, True, UNIFORM))


# Head widths the kernel's tiles cover: the query tile's fp32 accumulator lives in registers,
# and beyond 128 columns it spills.
MAX_HEAD_WIDTH = 128
WIDTH_ALIGNMENT = 16  # tl.dot's smallest dimension, and 32 bytes of bf16: vector loads


def tile_split(width):
    """The kernel's tile for a head `width` wide: (lo, hi), powers of two >= 16 (hi may be
    0), covering the multiple of 16 at or above `width` exactly when two such parts can
    (48 = 32 + 16, 96 = 64 + 32), else the next power of two (112 -> 128)."""
    padded = -(-max(width, 1) // WIDTH_ALIGNMENT) * WIDTH_ALIGNMENT
    lo = triton.next_power_of_2(padded)
    if lo == padded:
        return padded, 0
    lo //= 2
    rest = padded - lo
    if triton.next_power_of_2(rest) == rest:
        return lo, rest
    return triton.next_power_of_2(padded), 0


@dataclass(frozen=True)
class HeadLayout:
    """How the kernel covers a block's heads in its one launch: `uniform` when every head has
    exactly the tile's widths (no table, no column masks), `aligned` when every width and
    column is a multiple of 16 (the engine's padded heads), the (lo, hi) tile splits of the
    widest q/k and v heads, and the head table: six int rows (q col, k col, v col, ctx col,
    qk width, v width), one column per head."""

    uniform: bool
    aligned: bool
    dqk: tuple
    dv: tuple
    table: tuple


def head_layout(qk_dims, v_dims):
    qk_total = sum(qk_dims)
    dqk, dv = tile_split(max(qk_dims)), tile_split(max(v_dims))
    q_cols = [sum(qk_dims[:h]) for h in range(len(qk_dims))]
    v_cols = [sum(v_dims[:h]) for h in range(len(v_dims))]
    table = (tuple(q_cols), tuple(qk_total + c for c in q_cols),
             tuple(2 * qk_total + c for c in v_cols), tuple(v_cols), tuple(qk_dims), tuple(v_dims))
    uniform = set(qk_dims) == {sum(dqk)} and set(v_dims) == {sum(dv)}
    aligned = all(w % WIDTH_ALIGNMENT == 0 for w in (*qk_dims, *v_dims))
    return HeadLayout(uniform, aligned, dqk, dv, table)


def flash_attention_why_not(qk_dims, v_dims):
    """None when the kernel takes these head widths, else the reason."""
    widest = max(max(qk_dims), max(v_dims))
    if widest > MAX_HEAD_WIDTH:
        return (f"head width {widest} > {MAX_HEAD_WIDTH}: the Triton attention tile would spill "
                "its accumulator; use the cuda or torch backend")
    return None


# Enough 128-row programs to fill an H100/H200 (132 SMs) twice; below that, 64-row tiles
# give small batches twice the programs.
_MIN_PROGRAMS_128 = 264


def _attention_tile_config(device_type, block_dqk, block_dv, batch_heads=None, tokens=None,
                           arch=90):
    """Tile sizes for heads whose tiles are block_dqk / block_dv wide (lo + hi); `arch` is
    the GPU's compute capability as an int (90 for sm_90).

    sm_90: 128 query rows with 8 warps. Compiled (64/64 heads, bf16, triton 3.8) that is 120
    registers, no spills, 16-byte cp.async, 401 instructions per key-block iteration per warp
    against 436 for 64 rows with 4 warps, and each K/V tile serves twice the queries (197
    tokens fill two 128-row tiles as well as four 64-row ones). Small launches
    (batch_heads * row tiles < _MIN_PROGRAMS_128) keep 64-row tiles for parallelism, and so
    does sm_80, where 128 rows spill with a key bias (12 B) and 64 rows do not. Keys in blocks
    of 64, of 32 beyond 64 columns (registers). Under the CPU interpreter tiles stay small."""
    if device_type != "cuda":
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    block_n = 64 if max(block_dqk, block_dv) <= 64 else 32
    small = batch_heads is not None and tokens is not None and \
        batch_heads * triton.cdiv(tokens, 128) < _MIN_PROGRAMS_128
    if small or arch < 90:
        return dict(BLOCK_M=64, BLOCK_N=block_n, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=block_n, num_warps=8, num_stages=3)


def flash_attention_constexprs(layout, dtype, device_type, has_key_bias, batch_heads=None,
                               tokens=None, arch=90):
    """The kernel's constexpr and launch keywords (tile config included) for one layout."""
    return dict(HAS_KEY_BIAS=has_key_bias, UNIFORM=layout.uniform, ALIGNED=layout.aligned,
                DQK0=layout.dqk[0], DQK1=layout.dqk[1], DV0=layout.dv[0], DV1=layout.dv[1],
                DOT_PRECISION=dot_precision(dtype), DOT_UPCAST=dot_upcast(device_type, dtype),
                **_attention_tile_config(device_type, sum(layout.dqk), sum(layout.dv),
                                         batch_heads, tokens, arch))


def _arch(device):
    # The device's compute capability as an int (90 for sm_90); benchmarks/codegen_report.py
    # answers this call with the architecture it compiles for.
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def flash_attention_triton(qkv, batch, tokens, qk_dims, v_dims, scale, key_bias=None, *,
                           ctx=None, launch=None):
    """Attention core on packed qkv rows (B*N, 2*sum(qk)+sum(v)) (unit column stride) ->
    context rows (B*N, sum(v)), written into `ctx` when given. One launch for all heads."""
    reason = flash_attention_why_not(qk_dims, v_dims)
    if reason is not None:
        raise ValueError(f"attention_block (triton): {reason}")
    launch = launch or launch_directly
    if ctx is None:
        ctx = torch.empty((batch * tokens, sum(v_dims)), device=qkv.device, dtype=qkv.dtype)
    layout = head_layout(qk_dims, v_dims)
    # A uniform layout needs no table; the kernel never reads the pointer then.
    table = qkv if layout.uniform else cached_int_table(layout.table, qkv.device)
    heads = len(qk_dims)
    arch = _arch(qkv.device) if qkv.device.type == "cuda" else 90
    kw = flash_attention_constexprs(layout, qkv.dtype, qkv.device.type, key_bias is not None,
                                    batch * heads, tokens, arch)
    grid = (batch * heads * triton.cdiv(tokens, kw["BLOCK_M"]),)
    launch(_flash_attention_kernel)[grid](
        qkv, table, key_bias if key_bias is not None else qkv, ctx,
        tokens, heads, scale * _LOG2E,
        qkv.stride(0), ctx.stride(0), key_bias.stride(0) if key_bias is not None else 0, **kw)
    return ctx


def attention_block_triton(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight,
                           proj_bias, qk_dims, v_dims, scale, eps=1e-6, gamma=None, key_bias=None,
                           q_norm_weight=None, q_norm_bias=None, k_norm_weight=None, k_norm_bias=None,
                           rope_cos=None, rope_sin=None, rope_index=None, inner_norm_weight=None,
                           inner_norm_bias=None, *, qkv_folded=None, out=None, key_mean=None,
                           launch=None):
    """Runs the fused launches on x (B, N, D) (arguments in the op's schema order); writes
    into `out` when given (tests poison it). `launch` wraps each kernel (see launching.py).
    `qkv_folded` is fused_linear.fold_layer_norm(norm_weight, norm_bias, qkv_weight,
    qkv_bias), made once by the caller (the engine); without it the qkv weights are folded
    per call. q/k-norm and RoPE run in place on the qkv rows, the inner norm on the context
    rows (head_norm_rope.py), both on the real channels of padded heads. `key_mean`: a (B, N,
    key_mean_width(qk_dims)) tensor that receives the merge metric of the keys after q/k-norm
    (attention_block_key_mean; no RoPE)."""
    launch = launch or launch_directly
    real_qk, real_v = qk_dims, v_dims
    if any(w % HEAD_WIDTH_MULTIPLE for w in (*qk_dims, *v_dims)):
        # Widths off the multiples of 16 would take the kernel's masked path (scalar loads,
        # register spills at sm_90) and an unaligned proj GEMM: pad the heads here (exact;
        # build_engine pads once instead), and fold LayerNorm into the padded weights.
        qk_dims, v_dims, qkv_weight, qkv_bias, proj_weight = pad_head_weights(
            qk_dims, v_dims, qkv_weight, qkv_bias, proj_weight)
        qkv_folded = None
    batch, tokens, dim = x.shape
    rows_in = x.reshape(-1, dim)
    if not rows_in.is_contiguous():
        rows_in = rows_in.contiguous()
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if key_bias is not None and key_bias.stride(-1) != 1:
        key_bias = key_bias.contiguous()
    qkv = ln_linear(rows_in, norm_weight, norm_bias, qkv_weight, qkv_bias, eps,
                    launch=launch, folded=qkv_folded)
    if q_norm_weight is not None or rope_cos is not None:
        qk_norm_rope_(qkv, tokens, real_qk, qk_dims,
                      None if q_norm_weight is None else (q_norm_weight, q_norm_bias),
                      None if k_norm_weight is None else (k_norm_weight, k_norm_bias), eps,
                      None if rope_cos is None else (rope_cos, rope_sin, rope_index), launch=launch)
    if key_mean is not None:
        _write_key_mean(qkv, batch, tokens, real_qk, qk_dims, key_mean)
    ctx = flash_attention_triton(qkv, batch, tokens, qk_dims, v_dims, scale, key_bias, launch=launch)
    if inner_norm_weight is not None:
        inner_norm_(ctx, real_v, v_dims, inner_norm_weight, inner_norm_bias, eps, launch=launch)
    linear_residual(ctx, proj_weight, proj_bias, gamma, rows_in, out.view(-1, dim), launch=launch)
    return out


def attention_block_key_mean_triton(*args, launch=None, **options):
    """attention_block_triton with the merge metric as a second output (arguments in the op's
    schema order)."""
    x, qk_dims = args[0], args[7]
    key_mean = torch.empty((x.shape[0], x.shape[1], key_mean_width(qk_dims)), device=x.device,
                           dtype=x.dtype)
    out = attention_block_triton(*args, key_mean=key_mean, launch=launch, **options)
    return out, key_mean


def _write_key_mean(qkv, batch, tokens, real_qk, qk_dims, key_mean):
    # The real key columns of the qkv rows (padded here: each head's real columns first), as
    # key_mean_ref takes them; q/k-norm already ran on them in place
    qk_total = sum(qk_dims)
    keys = qkv[:, qk_total:2 * qk_total].view(batch, tokens, qk_total)
    if list(qk_dims) != list(real_qk):
        keys = torch.cat([k[..., :w] for k, w in zip(keys.split(list(qk_dims), dim=-1), real_qk)], dim=-1)
    key_mean.copy_(key_mean_ref(keys, real_qk))
