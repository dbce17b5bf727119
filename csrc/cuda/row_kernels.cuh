// Row-wise kernels shared by the block ops' CUDA impls (mlp_block.cu, attention.cu): the
// LayerNorm before a block's first GEMM and the epilogue after its last one.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>

#include "block_reduce.cuh"

namespace dcvit {

constexpr int kNormThreads = 256;
constexpr int kElementwiseThreads = 256;

// One block per row; statistics in fp32.
template <typename scalar_t>
__global__ void layer_norm_rows_kernel(const scalar_t* __restrict__ x,
                                       const scalar_t* __restrict__ weight,
                                       const scalar_t* __restrict__ bias, scalar_t* __restrict__ y,
                                       int64_t dim, float eps) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const scalar_t* x_row = x + row * dim;
  float sum = 0.f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) sum += static_cast<float>(x_row[i]);
  const float mean = block_sum(sum, scratch) / dim;
  // Second pass over the (cached) row: variance of the centred values avoids the
  // cancellation of E[x^2] - E[x]^2 when the mean is large.
  float sq = 0.f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    const float d = static_cast<float>(x_row[i]) - mean;
    sq += d * d;
  }
  const float rstd = rsqrtf(block_sum(sq, scratch) / dim + eps);
  scalar_t* y_row = y + row * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    const float v = (static_cast<float>(x_row[i]) - mean) * rstd;
    y_row[i] = static_cast<scalar_t>(v * static_cast<float>(weight[i]) +
                                     static_cast<float>(bias[i]));
  }
}

// out = x + gamma * (y + bias) over (rows, dim) row-major tensors; bias and gamma (dim,)
// may be null. The sum is formed in fp32 and rounded once.
template <typename scalar_t>
__global__ void residual_epilogue_kernel(const scalar_t* __restrict__ x,
                                         const scalar_t* __restrict__ y,
                                         const scalar_t* __restrict__ bias,
                                         const scalar_t* __restrict__ gamma,
                                         scalar_t* __restrict__ out, int64_t numel, int64_t dim) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += stride) {
    const int64_t c = i % dim;
    float branch = static_cast<float>(y[i]);
    if (bias != nullptr) branch += static_cast<float>(bias[c]);
    if (gamma != nullptr) branch *= static_cast<float>(gamma[c]);
    out[i] = static_cast<scalar_t>(static_cast<float>(x[i]) + branch);
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
  const at::Tensor w = weight.contiguous(), b = bias.contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows_in.scalar_type(), "layer_norm_rows", [&] {
    layer_norm_rows_kernel<scalar_t><<<rows, kNormThreads, 0, stream>>>(
        rows_in.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
        normed.data_ptr<scalar_t>(), rows_in.size(1), static_cast<float>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return normed;
}

// out_rows = x_rows + gamma * (y + bias) for contiguous (rows, dim) tensors; bias and gamma
// are optional (dim,) vectors.
inline void residual_epilogue(const at::Tensor& x_rows, const at::Tensor& y,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& gamma, at::Tensor& out_rows) {
  const int64_t numel = y.numel();
  if (numel == 0) return;
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor g = gamma.has_value() ? gamma->contiguous() : at::Tensor();
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "residual_epilogue", [&] {
    residual_epilogue_kernel<scalar_t><<<elementwise_blocks(numel), kElementwiseThreads, 0, stream>>>(
        x_rows.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
        b.defined() ? b.data_ptr<scalar_t>() : nullptr,
        g.defined() ? g.data_ptr<scalar_t>() : nullptr, out_rows.data_ptr<scalar_t>(), numel,
        y.size(-1));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace dcvit
