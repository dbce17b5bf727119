// CUDA implementation of dcvit::mlp_block (see ../mlp_block.h).
//
// The two GEMMs run on cuBLAS(Lt) through ATen (at::mm), which reaches the tensor cores at
// near peak; everything between them is fused into our own kernels so each activation is
// read and written once:
//   1. LayerNorm           x -> xn                          (fp32 statistics)
//   2. GEMM                xn @ fc1^T
//   3. bias + exact GELU   in place on the (rows, H) hidden activations
//   4. GEMM                hidden @ fc2^T
//   5. epilogue            out = x + gamma * (y + fc2_bias)
// cuBLASLt's GELU epilogue is the tanh approximation, not timm's erf GELU, so step 3 is ours.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../mlp_block.h"
#include "block_reduce.cuh"

namespace dcvit {
namespace {

constexpr int kNormThreads = 256;
constexpr int kElementwiseThreads = 256;

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

template <typename scalar_t>
__global__ void bias_gelu_kernel(scalar_t* __restrict__ h, const scalar_t* __restrict__ bias,
                                 int64_t numel, int64_t hidden) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += stride) {
    const float v = static_cast<float>(h[i]) + static_cast<float>(bias[i % hidden]);
    h[i] = static_cast<scalar_t>(0.5f * v * (1.f + erff(v * 0.70710678118654752f)));
  }
}

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
    float branch = static_cast<float>(y[i]) + static_cast<float>(bias[c]);
    if (gamma != nullptr) branch *= static_cast<float>(gamma[c]);
    out[i] = static_cast<scalar_t>(static_cast<float>(x[i]) + branch);
  }
}

int elementwise_blocks(int64_t numel) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t wanted = (numel + kElementwiseThreads - 1) / kElementwiseThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, sms * 32)));
}

at::Tensor& mlp_block_out_cuda(const at::Tensor& x, const at::Tensor& norm_weight,
                               const at::Tensor& norm_bias, const at::Tensor& fc1_weight,
                               const at::Tensor& fc1_bias, const at::Tensor& fc2_weight,
                               const at::Tensor& fc2_bias, const std::optional<at::Tensor>& gamma,
                               double eps, at::Tensor& out) {
  check_mlp_block_args(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                       gamma, out);
  TORCH_CHECK(x.is_cuda(), "mlp_block (cuda): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t dim = x.size(-1);
  const int64_t hidden_width = fc1_weight.size(0);
  const at::Tensor rows_in = x.reshape({-1, dim}).contiguous();
  const int64_t rows = rows_in.size(0);
  if (rows == 0) return out;
  const at::Tensor nw = norm_weight.contiguous(), nb = norm_bias.contiguous();
  const at::Tensor b1 = fc1_bias.contiguous(), b2 = fc2_bias.contiguous();
  const at::Tensor g = gamma.has_value() ? gamma->contiguous() : at::Tensor();

  at::Tensor normed = at::empty_like(rows_in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mlp_block_ln", [&] {
    layer_norm_rows_kernel<scalar_t><<<rows, kNormThreads, 0, stream>>>(
        rows_in.data_ptr<scalar_t>(), nw.data_ptr<scalar_t>(), nb.data_ptr<scalar_t>(),
        normed.data_ptr<scalar_t>(), dim, static_cast<float>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor hidden = at::mm(normed, fc1_weight.t());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mlp_block_gelu", [&] {
    bias_gelu_kernel<scalar_t><<<elementwise_blocks(hidden.numel()), kElementwiseThreads, 0,
                                 stream>>>(hidden.data_ptr<scalar_t>(), b1.data_ptr<scalar_t>(),
                                           hidden.numel(), hidden_width);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const at::Tensor branch = at::mm(hidden, fc2_weight.t());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mlp_block_out", [&] {
    residual_epilogue_kernel<scalar_t><<<elementwise_blocks(branch.numel()), kElementwiseThreads,
                                         0, stream>>>(
        rows_in.data_ptr<scalar_t>(), branch.data_ptr<scalar_t>(), b2.data_ptr<scalar_t>(),
        gamma.has_value() ? g.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
        branch.numel(), dim);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor mlp_block_cuda(const at::Tensor& x, const at::Tensor& norm_weight,
                          const at::Tensor& norm_bias, const at::Tensor& fc1_weight,
                          const at::Tensor& fc1_bias, const at::Tensor& fc2_weight,
                          const at::Tensor& fc2_bias, const std::optional<at::Tensor>& gamma,
                          double eps) {
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  return mlp_block_out_cuda(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                            gamma, eps, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(dcvit, CUDA, m) {
  m.impl("mlp_block", &mlp_block_cuda);
  m.impl("mlp_block.out", &mlp_block_out_cuda);
}

}  // namespace dcvit
