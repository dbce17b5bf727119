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
#include "row_kernels.cuh"

namespace dcvit {
namespace {

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
  const at::Tensor b1 = fc1_bias.contiguous();

  const at::Tensor normed = layer_norm_rows(rows_in, norm_weight, norm_bias, eps);
  at::Tensor hidden = at::mm(normed, fc1_weight.t());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mlp_block_gelu", [&] {
    bias_gelu_kernel<scalar_t><<<elementwise_blocks(hidden.numel()), kElementwiseThreads, 0,
                                 stream>>>(hidden.data_ptr<scalar_t>(), b1.data_ptr<scalar_t>(),
                                           hidden.numel(), hidden_width);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const at::Tensor branch = at::mm(hidden, fc2_weight.t());
  at::Tensor rows_out = out.view({-1, dim});
  residual_epilogue(rows_in, branch, fc2_bias, gamma, rows_out);
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
