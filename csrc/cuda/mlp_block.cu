// CUDA implementation of dcvit::mlp_block (see ../mlp_block.h).
//
// The two GEMMs run on cuBLAS(Lt) through ATen, which reaches the tensor cores at near
// peak; everything between them is fused into our own kernels so each activation is read
// and written once:
//   1. LayerNorm           x -> xn                          (fp32 statistics)
//   2. GEMM + bias         xn @ fc1^T + b1 (at::addmm: cuBLASLt's bias epilogue)
//   3. exact GELU          in place on the (rows, H) hidden activations
//   4. GEMM                hidden @ fc2^T
//   5. epilogue            out = x + gamma * (y + fc2_bias)
// cuBLASLt's GELU epilogue is the tanh approximation, not timm's erf GELU, so step 3 is ours.
// The row kernels move 16-byte packs (8 x bf16) wherever the data is 16-byte aligned.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../functional_from_out.h"
#include "../mlp_block.h"
#include "row_kernels.cuh"

namespace dcvit {
namespace {

__device__ __forceinline__ float gelu_erf(float v) {
  return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
}

// Exact (erf) GELU in place over `numel` contiguous elements of a 16-byte-aligned buffer:
// 16-byte packs, grid-stride with a 64-bit pack index (no division), then the last
// numel % VEC (< VEC) elements by the first threads.
template <typename scalar_t>
__global__ void gelu_kernel(scalar_t* __restrict__ h, int64_t numel) {
  constexpr int VEC = kVec16<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  P* hp = reinterpret_cast<P*>(h);
  const int64_t packs = numel / VEC;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = first; i < packs; i += stride) {
    P p = hp[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) p.v[j] = static_cast<scalar_t>(gelu_erf(static_cast<float>(p.v[j])));
    hp[i] = p;
  }
  const int64_t tail = packs * VEC + first;
  if (tail < numel) h[tail] = static_cast<scalar_t>(gelu_erf(static_cast<float>(h[tail])));
}

at::Tensor& mlp_block_out_cuda(const at::Tensor& x, const at::Tensor& norm_weight,
                               const at::Tensor& norm_bias, const at::Tensor& fc1_weight,
                               const at::Tensor& fc1_bias, const at::Tensor& fc2_weight,
                               const at::Tensor& fc2_bias, double eps,
                               const std::optional<at::Tensor>& gamma, at::Tensor& out) {
  check_mlp_block_args(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                       gamma, out);
  TORCH_CHECK(x.is_cuda(), "mlp_block (cuda): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t dim = x.size(-1);
  const at::Tensor rows_in = x.reshape({-1, dim}).contiguous();
  const int64_t rows = rows_in.size(0);
  if (rows == 0) return out;
  const at::Tensor normed = layer_norm_rows(rows_in, norm_weight, norm_bias, eps);
  at::Tensor hidden = at::addmm(fc1_bias, normed, fc1_weight.t());
  if (aligned16(hidden.data_ptr())) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mlp_block_gelu", [&] {
      const int64_t numel = hidden.numel();
      // at least VEC threads, so the tail (< VEC elements) has a thread per element
      gelu_kernel<scalar_t><<<elementwise_blocks(std::max<int64_t>(numel / kVec16<scalar_t>, 1)),
                              kElementwiseThreads, 0, stream>>>(hidden.data_ptr<scalar_t>(), numel);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    at::gelu_(hidden);  // exact (erf); the caching allocator's buffers are always aligned
  }

  const at::Tensor branch = at::mm(hidden, fc2_weight.t());
  at::Tensor rows_out = out.view({-1, dim});
  residual_epilogue(rows_in, branch, fc2_bias, gamma, rows_out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dcvit, CUDA, m) {
  impl_with_out<&mlp_block_outputs, &mlp_block_out_cuda>(m, "mlp_block");
}

}  // namespace dcvit
