"""Fused MLP-only block: out = x + gamma * fc2(GELU(fc1(LayerNorm(x)))).

Two kernels, because the whole D-wide output row of fc2 cannot stay in registers next to
an H-wide hidden tile:
  1. `_ln_fc1_gelu_kernel`: LayerNorm applied in the GEMM's prologue (row statistics in
     fp32, computed per row tile from L2-resident x), fc1 on tensor cores, bias + exact
     (erf) GELU in the epilogue. The normalized x is never written to memory.
  2. `_fc2_residual_kernel`: fc2 with bias, LayerScale and the residual add in the epilogue.
Memory traffic is x read ~3x (from L2 after the first), hidden written and read once, out
written once: the floor is the two GEMMs' FLOPs.
"""
import torch
import triton
import triton.language as tl

_SQRT1_2 = 0.7071067811865476


def mlp_block_ref(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                  gamma=None, eps=1e-6):
    """Plain-PyTorch definition of the op (timm's Block MLP branch with its residual)."""
    h = torch.nn.functional.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    h = torch.nn.functional.gelu(torch.nn.functional.linear(h, fc1_weight, fc1_bias))
    y = torch.nn.functional.linear(h, fc2_weight, fc2_bias)
    return x + (y * gamma if gamma is not None else y)


def _dot_precision(dtype):
    # fp32 inputs get true fp32 products (as torch's default matmul), not TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _dot_upcast(device_type, dtype):
    # The CPU interpreter (triton 3.9) computes tl.dot on bf16 operands wrongly (numpy has
    # no bf16). A product of two bf16 values is exact in fp32, so upcasting the operands
    # gives what the GPU's bf16 MMA computes, up to summation order.
    return device_type == "cpu" and dtype == torch.bfloat16


@triton.jit
def _ln_fc1_gelu_kernel(
    x_ptr, nw_ptr, nb_ptr, w_ptr, b_ptr, h_ptr,
    M, D, H, eps,
    stride_xm, stride_wn, stride_hm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(H, BLOCK_N)
    # Grouped ordering: programs that run together share rows of x and columns of W in L2.
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size)
    pid_n = (pid % (GROUP_M * num_n)) // group_size

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < H
    x_rows = x_ptr + rows[:, None] * stride_xm

    # LayerNorm statistics in fp32, two passes (mean, then centred variance).
    acc_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        xt = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < D), other=0.0)
        acc_sum += tl.sum(xt.to(tl.float32), axis=1)
    mean = acc_sum / D
    acc_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (ks[None, :] < D)
        xt = tl.load(x_rows + ks[None, :], mask=ok, other=0.0).to(tl.float32)
        centred = tl.where(ok, xt - mean[:, None], 0.0)
        acc_sq += tl.sum(centred * centred, axis=1)
    rstd = 1.0 / tl.sqrt(acc_sq / D + eps)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        xt = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        nw = tl.load(nw_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        nb = tl.load(nb_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        xn = (xt.to(tl.float32) - mean[:, None]) * rstd[:, None] * nw[None, :] + nb[None, :]
        wt = tl.load(w_ptr + cols[None, :] * stride_wn + ks[:, None],
                     mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        xn = xn.to(wt.dtype)
        if DOT_UPCAST:
            acc = tl.dot(xn.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xn, wt, acc, input_precision=DOT_PRECISION)

    bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = acc + bias[None, :]
    acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
    h_ptrs = h_ptr + rows[:, None] * stride_hm + cols[None, :]
    tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _fc2_residual_kernel(
    h_ptr, w_ptr, b_ptr, gamma_ptr, x_ptr, out_ptr,
    M, H, D,
    stride_hm, stride_wn, stride_xm, stride_om,
    HAS_GAMMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(D, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size)
    pid_n = (pid % (GROUP_M * num_n)) // group_size

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < D

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, H, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        ht = tl.load(h_ptr + rows[:, None] * stride_hm + ks[None, :],
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + cols[None, :] * stride_wn + ks[:, None],
                     mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if DOT_UPCAST:
            acc = tl.dot(ht.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(ht, wt, acc, input_precision=DOT_PRECISION)

    ok = row_ok[:, None] & col_ok[None, :]
    acc = acc + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_GAMMA:
        acc = acc * tl.load(gamma_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0)
    acc = acc + x.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=ok)


def _tile_config(device_type, n_cols, k_dim):
    """Tile sizes. On the GPU: 128x128x64 tiles suit H100/A100 tensor cores at ViT widths.
    Under the CPU interpreter every tile element costs Python time, so tiles stay small."""
    if device_type != "cuda":
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    block_n = 128 if n_cols >= 128 else 64
    return dict(BLOCK_M=128, BLOCK_N=block_n, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def mlp_block_triton(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                     gamma=None, eps=1e-6, out=None, kernel_launcher=None):
    """Runs the two fused kernels; writes into `out` when given (tests poison it).

    `kernel_launcher` wraps each kernel for torch.library.triton_op (wrap_triton); the
    default launches directly."""
    launch = kernel_launcher or (lambda kernel: kernel)
    dim = x.shape[-1]
    hidden_width = fc1_weight.shape[0]
    rows_in = x.reshape(-1, dim)
    if not rows_in.is_contiguous():
        rows_in = rows_in.contiguous()
    m = rows_in.shape[0]
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    rows_out = out.view(-1, dim)
    fc1_weight, fc2_weight = fc1_weight.contiguous(), fc2_weight.contiguous()
    hidden = torch.empty((m, hidden_width), device=x.device, dtype=x.dtype)
    precision = _dot_precision(x.dtype)
    upcast = _dot_upcast(x.device.type, x.dtype)

    cfg1 = _tile_config(x.device.type, hidden_width, dim)
    grid1 = (triton.cdiv(m, cfg1["BLOCK_M"]) * triton.cdiv(hidden_width, cfg1["BLOCK_N"]),)
    launch(_ln_fc1_gelu_kernel)[grid1](
        rows_in, norm_weight, norm_bias, fc1_weight, fc1_bias, hidden,
        m, dim, hidden_width, eps,
        rows_in.stride(0), fc1_weight.stride(0), hidden.stride(0),
        DOT_PRECISION=precision, DOT_UPCAST=upcast, **cfg1,
    )
    cfg2 = _tile_config(x.device.type, dim, hidden_width)
    grid2 = (triton.cdiv(m, cfg2["BLOCK_M"]) * triton.cdiv(dim, cfg2["BLOCK_N"]),)
    launch(_fc2_residual_kernel)[grid2](
        hidden, fc2_weight, fc2_bias, gamma if gamma is not None else fc2_bias, rows_in, rows_out,
        m, hidden_width, dim,
        hidden.stride(0), fc2_weight.stride(0), rows_in.stride(0), rows_out.stride(0),
        HAS_GAMMA=gamma is not None, DOT_PRECISION=precision, DOT_UPCAST=upcast, **cfg2,
    )
    return out
