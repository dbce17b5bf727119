"""GEMMs with fused epilogues shared by the block ops (MLP block, attention block).

  `ln_linear`:               y = act(LayerNorm(x) @ W^T + b) as a plain GEMM. The LayerNorm
                             affine is folded into the weights once (`fold_layer_norm`:
                             W' = W diag(g), b' = W beta + b, s = row sums of W'), so
                             LayerNorm(x) W^T + b = rstd * (x W'^T - mean * s) + b'.
                             `_row_stats_kernel` makes each row's mean and rstd in one small
                             pass; `_norm_linear_kernel` applies them in the epilogue, so both
                             GEMM operands stay in shared memory (no per-K-step normalization).
                             act is identity, exact (erf) GELU, tanh GELU, QuickGELU or SiLU
                             (ACTIVATIONS). Gated (GLU / SwiGLU): W is (2H, D), rows [0, H)
                             the activated half and [H, 2H) the linear half, and
                             y = act(a) * b (M, H) from the same GEMM: each tile's column 2i
                             loads W's row p (pair p of the tile), column 2i+1 row H + p, so
                             both halves of a pair meet in one thread's accumulator registers
                             and the gate product is an epilogue (no second pass, no packing).
  `linear_residual`:         out = x + gamma * (h @ W^T + b): bias, LayerScale and the
                             residual add in the epilogue; b and gamma are optional. With
                             `norm` (a LayerNorm over h's K channels folded into W like
                             ln_linear's: the MLP's inner norm) the row statistics of h are
                             applied in the epilogue too.
Both run on tensor cores with fp32 accumulation and grouped program ordering for L2 reuse.
Tiles: a fixed choice on the CPU interpreter and, without autotuning, on the GPU
(`gemm_tile_config`); on a GPU `triton.autotune` picks among `gemm_configs()` per shape.
"""
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .autotune_cache import share_tuning
from .launching import dot_precision, dot_upcast

# DCVIT_GEMM_AUTOTUNE=0 launches the fixed choice on the GPU too (to compare against it).
AUTOTUNE_ON_GPU = os.environ.get("DCVIT_GEMM_AUTOTUNE", "1") != "0"


class FoldedNorm(NamedTuple):
    """A LayerNorm affine folded into the Linear after it (see `fold_layer_norm`)."""

    weight: torch.Tensor  # (N, D) W diag(norm_weight), in W's dtype
    bias: torch.Tensor    # (N,) fp32: W norm_bias + b
    sums: torch.Tensor    # (N,) fp32: row sums of the rounded `weight` (the mean term)


# The activations of `ln_linear` (and the MLP block op): timm's nn.GELU, GELU(approximate=
# "tanh"), QuickGELU x * sigmoid(1.702 x) (OpenAI CLIP) and nn.SiLU.
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "silu")


class NormStats(NamedTuple):
    """What `linear_residual`'s epilogue needs to apply a LayerNorm over h's K channels that
    is folded into its weight: h's row statistics (fp32) and the folded weight's row sums
    (None when h was centred by `row_stats`: no mean term)."""

    mean: torch.Tensor
    rstd: torch.Tensor
    sums: torch.Tensor | None


def fold_layer_norm(norm_weight, norm_bias, weight, bias) -> FoldedNorm:
    """Fold LayerNorm's affine into the Linear that follows it. Done once per weight (the
    engine folds at build time); computed in fp64. The sums are taken over the rounded
    folded weight, so x W'^T - mean * s is exactly (x - mean) W'^T before rounding."""
    w64 = weight.detach().double()
    folded = (w64 * norm_weight.detach().double()[None, :]).to(weight.dtype).contiguous()
    sums = folded.double().sum(dim=1).float()
    b64 = w64 @ norm_bias.detach().double()
    if bias is not None:
        b64 = b64 + bias.detach().double()
    return FoldedNorm(folded, b64.float(), sums)


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering: programs that run together share rows of A and columns of W in L2.
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size)
    pid_n = (pid % (GROUP_M * num_n)) // group_size
    return pid_m, pid_n


@triton.jit
def _gemm_tile(a_ptr, w_ptr, rows, cols, row_ok, col_ok, K, stride_am, stride_wn,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    # fp32 accumulator of one (BLOCK_M, BLOCK_N) tile of A @ W^T; both operands go from
    # global memory to shared memory untouched, so the loop pipelines (cp.async / TMA).
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        at = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :],
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + cols[None, :] * stride_wn + ks[:, None],
                     mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if DOT_UPCAST:
            acc = tl.dot(at.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(at, wt, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _program_gemm_tile(a_ptr, w_ptr, M, N, K, stride_am, stride_wn,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
                       GATED: tl.constexpr):
    # This program's tile of A @ W^T (both GEMM kernels): the fp32 accumulator, its rows,
    # which of them exist, and its first column. GATED (W's N rows are two halves of N / 2):
    # tile column 2i is row p = first pair + i of the first half, column 2i + 1 row N / 2 + p,
    # so a pair sits in adjacent accumulator columns (one thread's registers in the MMA
    # layouts) and the tile's first column is 2 * its first pair.
    pid = tl.program_id(0).to(tl.int64)
    pid_m, pid_n = _grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if GATED:
        lane = tl.arange(0, BLOCK_N)
        pairs = pid_n * (BLOCK_N // 2) + lane // 2
        cols = pairs + (lane % 2) * (N // 2)
        col_ok = pairs < N // 2
    else:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
    row_ok = rows < M
    acc = _gemm_tile(a_ptr, w_ptr, rows, cols, row_ok, col_ok, K, stride_am, stride_wn,
                     BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, DOT_UPCAST)
    return acc, rows, row_ok, pid_n * BLOCK_N


@triton.jit
def _row_stats_kernel(
    x_ptr, mean_ptr, rstd_ptr, xc_ptr,
    M, D, eps, stride_xm, stride_cm,
    WRITE_CENTRED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # LayerNorm statistics of BLOCK_M rows in fp32: mean, then the centred variance (no
    # E[x^2] - E[x]^2 cancellation). WRITE_CENTRED also stores x - mean (fp32 inputs: there
    # the mean term of the folded GEMM would cost more accuracy than torch loses).
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    x_rows = x_ptr + rows[:, None] * stride_xm
    acc_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(0, D, BLOCK_D):
        ks = k + tl.arange(0, BLOCK_D)
        xt = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < D), other=0.0)
        acc_sum += tl.sum(xt.to(tl.float32), axis=1)
    mean = acc_sum / D
    acc_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(0, D, BLOCK_D):
        ks = k + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (ks[None, :] < D)
        xt = tl.load(x_rows + ks[None, :], mask=ok, other=0.0).to(tl.float32)
        centred = tl.where(ok, xt - mean[:, None], 0.0)
        acc_sq += tl.sum(centred * centred, axis=1)
        if WRITE_CENTRED:
            tl.store(xc_ptr + rows[:, None] * stride_cm + ks[None, :],
                     centred.to(xc_ptr.dtype.element_ty), mask=ok)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, 1.0 / tl.sqrt(acc_sq / D + eps), mask=row_ok)


@triton.jit
def _norm_linear_kernel(
    x_ptr, w_ptr, b_ptr, sums_ptr, mean_ptr, rstd_ptr, y_ptr,
    M, K, N,
    stride_xm, stride_wn, stride_ym,
    SUBTRACT_MEAN: tl.constexpr, ACTIVATION: tl.constexpr, GATED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    # y = act(rstd * (x W'^T - mean * s) + b'): LayerNorm + Linear with the affine folded in.
    # GATED: N = 2H GEMM columns, y (M, H) = act(first half) * second half.
    acc, rows, row_ok, first_col = _program_gemm_tile(x_ptr, w_ptr, M, N, K, stride_xm, stride_wn,
                                                      BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
                                                      DOT_PRECISION, DOT_UPCAST, GATED)
    if SUBTRACT_MEAN:
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
    else:
        mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
    PART: tl.constexpr = _epilogue_width(BLOCK_N)
    for part in tl.static_range(BLOCK_N // PART):
        tile = _column_part(acc, part, BLOCK_M, BLOCK_N, PART)
        if GATED:
            _gated_epilogue(tile, rows, (first_col + part * PART) // 2, PART // 2, row_ok, mean,
                            rstd, N // 2, b_ptr, sums_ptr, y_ptr, stride_ym, SUBTRACT_MEAN,
                            ACTIVATION)
        else:
            _norm_epilogue(tile, rows, first_col + part * PART, PART, row_ok, mean, rstd, N,
                           b_ptr, sums_ptr, y_ptr, stride_ym, SUBTRACT_MEAN, ACTIVATION)


@triton.constexpr_function
def _epilogue_width(block_n):
    # A 256-wide tile's epilogue runs in two halves: one pass would need addresses for a
    # 128x256 tile of loads and stores at once and spill (seen at sm_90).
    return block_n // 2 if block_n > 128 else block_n


@triton.jit
def _column_part(acc, PART_INDEX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 PART: tl.constexpr):
    # Columns [PART_INDEX * PART, (PART_INDEX + 1) * PART) of a (BLOCK_M, BLOCK_N) tile, PART
    # being BLOCK_N or its half (_epilogue_width).
    # (one return at the end: the compiler visits statements after a constexpr-if's return)
    if PART == BLOCK_N:
        part = acc
    else:
        lo, hi = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, PART)), (0, 2, 1)))
        if PART_INDEX == 0:
            part = lo
        else:
            part = hi
    return part


@triton.jit
def _activation(v, ACTIVATION: tl.constexpr):
    # fp32 in, fp32 out; ACTIVATION is one of ACTIVATIONS or "none"
    if ACTIVATION == "gelu":
        v = 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        # 0.5 v (1 + tanh(u)) = v * sigmoid(2u), u = sqrt(2/pi) (v + 0.044715 v^3)
        v = v * tl.sigmoid(1.5957691216057308 * (v + 0.044715 * v * v * v))
    elif ACTIVATION == "quick_gelu":
        # v / (1 + 2^(-1.702 log2(e) v)): v * sigmoid(1.702 v) spilled 16 bytes in the 128x256
        # sm_90 tile with triton 3.6; this form keeps fewer values live (no spill)
        v = v / (1.0 + tl.exp2(-2.4554669595930157 * v))
    elif ACTIVATION == "silu":
        v = v * tl.sigmoid(v)
    return v


@triton.jit
def _unfold_norm(acc, cols, col_ok, mean, rstd, b_ptr, sums_ptr, SUBTRACT_MEAN: tl.constexpr):
    # rstd * (acc - mean * s) + b' for the tile's columns `cols` of the folded weight
    if SUBTRACT_MEAN:
        # the products are exact and accumulate in fp32, so the cancellation against the
        # mean term loses ~|mean|/std fp32 ulps: far below a bf16/fp16 output's rounding
        sums = tl.load(sums_ptr + cols, mask=col_ok, other=0.0)
        acc = acc - mean[:, None] * sums[None, :]
    return acc * rstd[:, None] + tl.load(b_ptr + cols, mask=col_ok, other=0.0)[None, :]


@triton.jit
def _norm_epilogue(acc, rows, first_col, WIDTH: tl.constexpr, row_ok, mean, rstd, N, b_ptr, sums_ptr,
                   y_ptr, stride_ym, SUBTRACT_MEAN: tl.constexpr, ACTIVATION: tl.constexpr):
    cols = first_col + tl.arange(0, WIDTH)
    col_ok = cols < N
    acc = _activation(_unfold_norm(acc, cols, col_ok, mean, rstd, b_ptr, sums_ptr, SUBTRACT_MEAN),
                      ACTIVATION)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _gated_epilogue(acc, rows, first_pair, PAIRS: tl.constexpr, row_ok, mean, rstd, H, b_ptr, sums_ptr,
                    y_ptr, stride_ym, SUBTRACT_MEAN: tl.constexpr, ACTIVATION: tl.constexpr):
    # acc (BLOCK_M, 2 * PAIRS) in _program_gemm_tile's GATED column order: the split of the
    # last axis (size 2) takes each thread's own register pairs apart.
    gate, value = tl.split(tl.reshape(acc, (acc.shape[0], PAIRS, 2)))
    pairs = first_pair + tl.arange(0, PAIRS)
    ok = pairs < H
    gate = _unfold_norm(gate, pairs, ok, mean, rstd, b_ptr, sums_ptr, SUBTRACT_MEAN)
    value = _unfold_norm(value, pairs + H, ok, mean, rstd, b_ptr, sums_ptr, SUBTRACT_MEAN)
    y = _activation(gate, ACTIVATION) * value
    tl.store(y_ptr + rows[:, None] * stride_ym + pairs[None, :], y.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & ok[None, :])


@triton.jit
def _linear_residual_kernel(
    h_ptr, w_ptr, b_ptr, gamma_ptr, x_ptr, out_ptr, sums_ptr, mean_ptr, rstd_ptr,
    M, K, N,
    stride_hm, stride_wn, stride_xm, stride_om,
    HAS_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_NORM: tl.constexpr,
    SUBTRACT_MEAN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    # HAS_NORM: a LayerNorm over h's K channels folded into W (rstd, and the mean term
    # unless h is centred, applied as in _norm_linear_kernel)
    acc, rows, row_ok, first_col = _program_gemm_tile(h_ptr, w_ptr, M, N, K, stride_hm, stride_wn,
                                                      BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
                                                      DOT_PRECISION, DOT_UPCAST, False)
    if HAS_NORM:
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        if SUBTRACT_MEAN:
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        else:
            mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    else:
        rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
        mean = rstd
    PART: tl.constexpr = _epilogue_width(BLOCK_N)  # in halves for 256-wide tiles
    for part in tl.static_range(BLOCK_N // PART):
        _residual_epilogue(_column_part(acc, part, BLOCK_M, BLOCK_N, PART), rows,
                           first_col + part * PART, PART, row_ok, N, b_ptr, gamma_ptr, x_ptr,
                           out_ptr, sums_ptr, mean, rstd, stride_xm, stride_om, HAS_BIAS, HAS_GAMMA,
                           HAS_NORM, SUBTRACT_MEAN)


@triton.jit
def _residual_epilogue(acc, rows, first_col, WIDTH: tl.constexpr, row_ok, N, b_ptr, gamma_ptr, x_ptr, out_ptr,
                       sums_ptr, mean, rstd, stride_xm, stride_om, HAS_BIAS: tl.constexpr,
                       HAS_GAMMA: tl.constexpr, HAS_NORM: tl.constexpr, SUBTRACT_MEAN: tl.constexpr):
    cols = first_col + tl.arange(0, WIDTH)
    col_ok = cols < N
    ok = row_ok[:, None] & col_ok[None, :]
    if HAS_NORM:
        if SUBTRACT_MEAN:
            acc = acc - mean[:, None] * tl.load(sums_ptr + cols, mask=col_ok, other=0.0)[None, :]
        acc = acc * rstd[:, None]
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_GAMMA:
        acc = acc * tl.load(gamma_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0)
    acc = acc + x.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=ok)


# ---- tile configurations -------------------------------------------------------------

def _cfg(block_m, block_n, warps, stages):
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64, GROUP_M=8, num_warps=warps,
                num_stages=stages)


# The GPU set for aligned shapes (N, K and the row strides multiples of 16 elements, as the
# engine pads them): all compile for sm_90 without spills for both GEMM kernels in bf16 and
# fp16 (benchmarks/codegen_report.py). 128x256 uses two warpgroups of 64x256 wgmma;
# 64x128 / 128x64 serve narrow (pruned) widths and few rows.
GPU_GEMM_CONFIGS = (
    _cfg(128, 128, 8, 3),
    _cfg(128, 128, 8, 4),
    _cfg(128, 256, 8, 3),
    _cfg(128, 256, 8, 4),
    _cfg(64, 128, 4, 4),
    _cfg(128, 64, 4, 4),
)
# Unaligned shapes get scalar loads without cp.async; there 128x256 and 64x128 spill.
GPU_UNALIGNED_GEMM_CONFIGS = (
    _cfg(128, 128, 8, 3),
    _cfg(128, 128, 8, 4),
    _cfg(128, 64, 4, 4),
)
# Under the CPU interpreter every tile element costs Python time, so tiles stay small.
INTERPRETER_GEMM_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4,
                               num_stages=1)


def gemm_config_name(cfg) -> str:
    """e.g. 'm128n256k64w8s4' (tile M x N x K, warps, pipeline stages)."""
    return (f"m{cfg['BLOCK_M']}n{cfg['BLOCK_N']}k{cfg['BLOCK_K']}"
            f"w{cfg['num_warps']}s{cfg['num_stages']}")


def gemm_configs(device_type="cuda", aligned=True):
    """Every config autotuning may pick on this device type (a list of dicts); `aligned`:
    N, K and the row strides are multiples of 16 elements."""
    if device_type != "cuda":
        return [dict(INTERPRETER_GEMM_CONFIG)]
    return [dict(c) for c in (GPU_GEMM_CONFIGS if aligned else GPU_UNALIGNED_GEMM_CONFIGS)]


def gemm_tile_config(device_type, n_cols):
    """The fixed choice, used without autotuning (the CPU interpreter; DCVIT_GEMM_AUTOTUNE=0)
    and reported by the code-generation gate: 128x128x64, 8 warps, 4 stages for widths of
    128 and more, 128x64 below."""
    if device_type != "cuda":
        return dict(INTERPRETER_GEMM_CONFIG)
    return _cfg(128, 128, 8, 4) if n_cols >= 128 else _cfg(128, 64, 4, 4)


def _autotuned(kernel, configs):
    configs = [triton.Config({k: v for k, v in c.items() if k.isupper()},
                             num_warps=c["num_warps"], num_stages=c["num_stages"])
               for c in configs]
    # M bucketed and picks kept across processes (autotune_cache): batch sizes share results
    return share_tuning(triton.autotune(configs=configs, key=["M", "N", "K"])(kernel))


_TUNED = {(kernel, aligned): _autotuned(kernel, GPU_GEMM_CONFIGS if aligned else GPU_UNALIGNED_GEMM_CONFIGS)
          for kernel in (_norm_linear_kernel, _linear_residual_kernel) for aligned in (True, False)}


def _launch_gemm(kernel, launch, device_type, m, n, args, constexprs, tile_config, sizes):
    # sizes: N, K and the row strides; the JIT vectorizes when all are multiples of 16
    if tile_config is None and device_type == "cuda" and AUTOTUNE_ON_GPU:
        aligned = all(v % 16 == 0 for v in sizes)
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        launch(_TUNED[kernel, aligned])[grid](*args, **constexprs)
        return
    cfg = tile_config or gemm_tile_config(device_type, n)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    launch(kernel)[grid](*args, **constexprs, **cfg)


# ---- launchers ------------------------------------------------------------------------

def row_stats(rows_in, eps, *, launch, centred=None):
    """Per-row mean and rstd (fp32) of contiguous rows (M, D); writes x - mean into `centred`
    when given."""
    m, dim = rows_in.shape
    mean = torch.empty(m, device=rows_in.device, dtype=torch.float32)
    rstd = torch.empty(m, device=rows_in.device, dtype=torch.float32)
    gpu = rows_in.device.type == "cuda"
    block_m, block_d = (4, 256) if gpu else (16, 64)
    launch(_row_stats_kernel)[(triton.cdiv(m, block_m),)](
        rows_in, mean, rstd, centred if centred is not None else rows_in,
        m, dim, eps, rows_in.stride(0), centred.stride(0) if centred is not None else 0,
        WRITE_CENTRED=centred is not None, BLOCK_M=block_m, BLOCK_D=block_d,
        num_warps=4 if gpu else 1,
    )
    return mean, rstd


def ln_linear(rows_in, norm_weight, norm_bias, weight, bias, eps, *, launch, act="none", gated=False,
              folded=None, tile_config=None):
    """act(LayerNorm(rows_in) @ weight^T + bias) for contiguous rows_in (M, D); bias may be None.
    `act`: "none" or one of ACTIVATIONS. `gated`: weight is (2H, D) and the result (M, H) is
    act(first half) * second half (see the module docstring).

    `folded` is `fold_layer_norm(norm_weight, norm_bias, weight, bias)`, made once by the
    caller (the engine at build time); without it the weights are folded here, per call.
    `tile_config`: one of gemm_configs() instead of the device's choice (tests, benchmarks)."""
    if folded is None:
        folded = fold_layer_norm(norm_weight, norm_bias, weight, bias)
    m, dim = rows_in.shape
    width = folded.weight.shape[0]
    # fp32 rows are centred in the statistics pass (see _row_stats_kernel); half-precision
    # rows go to the GEMM as they are and the mean is subtracted in the epilogue.
    centred = torch.empty_like(rows_in) if rows_in.dtype == torch.float32 else None
    mean, rstd = row_stats(rows_in, eps, launch=launch, centred=centred)
    a = centred if centred is not None else rows_in
    y = torch.empty((m, width // 2 if gated else width), device=rows_in.device, dtype=rows_in.dtype)
    args = (a, folded.weight, folded.bias, folded.sums, mean, rstd, y, m, dim, width,
            a.stride(0), folded.weight.stride(0), y.stride(0))
    constexprs = dict(SUBTRACT_MEAN=centred is None, ACTIVATION=act, GATED=gated,
                      DOT_PRECISION=dot_precision(rows_in.dtype),
                      DOT_UPCAST=dot_upcast(rows_in.device.type, rows_in.dtype))
    _launch_gemm(_norm_linear_kernel, launch, rows_in.device.type, m, width, args, constexprs,
                 tile_config, (width, dim, a.stride(0), folded.weight.stride(0), y.stride(0)))
    return y


def linear_residual(h, weight, bias, gamma, residual, out, *, launch, norm: NormStats | None = None,
                    tile_config=None):
    """out = residual + gamma * (h @ weight^T + bias) for row-major h (M, K), residual and
    out (M, N) with unit column stride; bias and gamma may be None. `norm`: weight and bias
    have a LayerNorm over h's K channels folded in (fold_layer_norm) and these are h's
    statistics (`row_stats`). `tile_config` as in ln_linear."""
    m, k_dim = h.shape
    width = weight.shape[0]
    weight = weight.contiguous()
    # An unused pointer argument still needs a tensor; the constexpr flag keeps it unread.
    placeholder = residual
    stats = (norm.sums if norm is not None and norm.sums is not None else placeholder,
             *((norm.mean, norm.rstd) if norm is not None else (placeholder, placeholder)))
    args = (h, weight, bias if bias is not None else placeholder,
            gamma if gamma is not None else placeholder, residual, out, *stats,
            m, k_dim, width,
            h.stride(0), weight.stride(0), residual.stride(0), out.stride(0))
    constexprs = dict(HAS_BIAS=bias is not None, HAS_GAMMA=gamma is not None, HAS_NORM=norm is not None,
                      SUBTRACT_MEAN=norm is not None and norm.sums is not None,
                      DOT_PRECISION=dot_precision(h.dtype), DOT_UPCAST=dot_upcast(h.device.type, h.dtype))
    _launch_gemm(_linear_residual_kernel, launch, h.device.type, m, width, args, constexprs,
                 tile_config, (width, k_dim, h.stride(0), weight.stride(0), residual.stride(0),
                               out.stride(0)))
    return out
