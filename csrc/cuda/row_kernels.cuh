// Row-wise kernels shared by the block ops' CUDA impls (mlp_block.cu, attention.cu): the
// LayerNorm before a block's first GEMM and the epilogue after its last one.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>

#include "block_reduce.cuh"

namespace dcvit {

constexpr int kNormThreads = 256;
constexpr int kElementwiseThreads = 256;

// VEC consecutive elements moved as one access: 16 bytes (8 x bf16/fp16, 4 x fp32). Rows
// that are not 16-byte aligned (a width that is no multiple of 8 bf16) go to ATen instead,
// so no row kernel here has a scalar 2-byte main loop.
template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

template <typename scalar_t>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(scalar_t));

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether every row of width `dim` of each (contiguous) tensor starts on a 16-byte boundary.
template <typename scalar_t>
inline bool rows_vectorizable(int64_t dim, std::initializer_list<const void*> ptrs) {
  if (dim % kVec16<scalar_t> != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return false;
  return true;
}

// One block per row; statistics in fp32. VEC divides dim (rows_vectorizable), so each
// thread moves whole 16-byte packs with no per-element index arithmetic.
template <typename scalar_t, int VEC>
__global__ void layer_norm_rows_kernel(const scalar_t* __restrict__ x,
                                       const scalar_t* __restrict__ weight,
                                       const scalar_t* __restrict__ bias, scalar_t* __restrict__ y,
                                       int dim, float eps) {
  using P = Pack<scalar_t, VEC>;
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int packs = dim / VEC;
  const P* x_row = reinterpret_cast<const P*>(x + row * dim);
  float sum = 0.f;
  for (int i = threadIdx.x; i < packs; i += blockDim.x) {
    const P p = x_row[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) sum += static_cast<float>(p.v[j]);
  }
  const float mean = block_sum(sum, scratch) / dim;
  // Second pass over the (cached) row: variance of the centred values avoids the
  // cancellation of E[x^2] - E[x]^2 when the mean is large.
  float sq = 0.f;
  for (int i = threadIdx.x; i < packs; i += blockDim.x) {
    const P p = x_row[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float d = static_cast<float>(p.v[j]) - mean;
      sq += d * d;
    }
  }
  const float rstd = rsqrtf(block_sum(sq, scratch) / dim + eps);
  const P* w = reinterpret_cast<const P*>(weight);
  const P* b = reinterpret_cast<const P*>(bias);
  P* y_row = reinterpret_cast<P*>(y + row * dim);
  for (int i = threadIdx.x; i < packs; i += blockDim.x) {
    const P p = x_row[i], wp = w[i], bp = b[i];
    P o;
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      o.v[j] = static_cast<scalar_t>((static_cast<float>(p.v[j]) - mean) * rstd *
                                         static_cast<float>(wp.v[j]) +
                                     static_cast<float>(bp.v[j]));
    y_row[i] = o;
  }
}

// out = x + gamma * (y + bias) over (rows, dim) row-major tensors; bias and gamma (dim,)
// may be null. The sum is formed in fp32 and rounded once. 2-D: threadIdx.x walks the
// packs of a row (bias and gamma loaded once per thread), threadIdx.y / blockIdx.y the rows.
template <typename scalar_t, int VEC>
__global__ void residual_epilogue_kernel(const scalar_t* __restrict__ x,
                                         const scalar_t* __restrict__ y,
                                         const scalar_t* __restrict__ bias,
                                         const scalar_t* __restrict__ gamma,
                                         scalar_t* __restrict__ out, int64_t rows, int dim) {
  using P = Pack<scalar_t, VEC>;
  const int packs = dim / VEC;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= packs) return;
  float b[VEC], g[VEC];
  const P bp = bias != nullptr ? reinterpret_cast<const P*>(bias)[c] : P{};
  const P gp = gamma != nullptr ? reinterpret_cast<const P*>(gamma)[c] : P{};
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    b[j] = bias != nullptr ? static_cast<float>(bp.v[j]) : 0.f;
    g[j] = gamma != nullptr ? static_cast<float>(gp.v[j]) : 1.f;
  }
  const P* xp = reinterpret_cast<const P*>(x);
  const P* yp = reinterpret_cast<const P*>(y);
  P* op = reinterpret_cast<P*>(out);
  const int64_t row_step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < rows;
       r += row_step) {
    const int64_t at = r * packs + c;
    const P xv = xp[at], yv = yp[at];
    P o;
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      o.v[j] = static_cast<scalar_t>(static_cast<float>(xv.v[j]) +
                                     (static_cast<float>(yv.v[j]) + b[j]) * g[j]);
    op[at] = o;
  }
}

// Grid size of a grid-stride elementwise kernel: enough blocks to fill the GPU, no more.
inline int elementwise_blocks(int64_t numel) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t wanted = (numel + kElementwiseThreads - 1) / kElementwiseThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, sms * 32)));
}

// LayerNorm of contiguous rows (rows, dim) into a new tensor, on the current stream.
inline at::Tensor layer_norm_rows(const at::Tensor& rows_in, const at::Tensor& weight,
                                  const at::Tensor& bias, double eps) {
  at::Tensor normed = at::empty_like(rows_in);
  const int64_t rows = rows_in.size(0);
  if (rows == 0) return normed;
  TORCH_CHECK(rows_in.size(1) <= std::numeric_limits<int>::max(), "layer_norm_rows: row too wide");
  const at::Tensor w = weight.contiguous(), b = bias.contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows_in.scalar_type(), "layer_norm_rows", [&] {
    const int dim = static_cast<int>(rows_in.size(1));
    const scalar_t *xp = rows_in.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>(),
                   *bp = b.data_ptr<scalar_t>();
    scalar_t* yp = normed.data_ptr<scalar_t>();
    if (rows_vectorizable<scalar_t>(dim, {xp, wp, bp, yp})) {
      layer_norm_rows_kernel<scalar_t, kVec16<scalar_t>>
          <<<rows, kNormThreads, 0, stream>>>(xp, wp, bp, yp, dim, static_cast<float>(eps));
    } else {
      normed = at::layer_norm(rows_in, {dim}, w, b, eps);  // unaligned rows: ATen's kernel
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return normed;
}

template <typename scalar_t, int VEC>
void launch_residual_epilogue(const scalar_t* x, const scalar_t* y, const scalar_t* b,
                              const scalar_t* g, scalar_t* out, int64_t rows, int dim,
                              cudaStream_t stream) {
  const int packs = dim / VEC;
  // x threads cover a row's packs (a warp multiple), y threads fill the block with rows
  const int tx = std::min(kElementwiseThreads, (packs + 31) / 32 * 32);
  const int ty = std::max(1, kElementwiseThreads / tx);
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int gx = (packs + tx - 1) / tx;
  const int64_t gy = std::min<int64_t>((rows + ty - 1) / ty, std::max<int64_t>(1, sms * 32 / gx));
  residual_epilogue_kernel<scalar_t, VEC><<<dim3(gx, static_cast<unsigned>(std::min<int64_t>(gy, 65535))),
                                            dim3(tx, ty), 0, stream>>>(x, y, b, g, out, rows, dim);
}

// out_rows = x_rows + gamma * (y + bias) for contiguous (rows, dim) tensors; bias and gamma
// are optional (dim,) vectors.
inline void residual_epilogue(const at::Tensor& x_rows, const at::Tensor& y,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& gamma, at::Tensor& out_rows) {
  if (y.numel() == 0) return;
  TORCH_CHECK(y.size(-1) <= std::numeric_limits<int>::max(), "residual_epilogue: row too wide");
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor g = gamma.has_value() ? gamma->contiguous() : at::Tensor();
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "residual_epilogue", [&] {
    const int dim = static_cast<int>(y.size(-1));
    const int64_t rows = y.numel() / dim;
    const scalar_t *xp = x_rows.data_ptr<scalar_t>(), *yp = y.data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    const scalar_t* gp = g.defined() ? g.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out_rows.data_ptr<scalar_t>();
    if (rows_vectorizable<scalar_t>(dim, {xp, yp, bp, gp, op})) {
      launch_residual_epilogue<scalar_t, kVec16<scalar_t>>(xp, yp, bp, gp, op, rows, dim, stream);
    } else {
      // unaligned rows: ATen ops, still in fp32 and rounded once
      at::Tensor branch = y.to(at::kFloat);
      if (b.defined()) branch.add_(b.to(at::kFloat));
      if (g.defined()) branch.mul_(g.to(at::kFloat));
      out_rows.copy_(branch.add_(x_rows.to(at::kFloat)));
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace dcvit
