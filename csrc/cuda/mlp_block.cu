// CUDA implementation of dcvit::mlp_block (see ../mlp_block.h).
//
// The two GEMMs run on cuBLAS(Lt) through ATen, which reaches the tensor cores at near
// peak; everything between them is fused into our own kernels so each activation is read
// and written once:
//   1. LayerNorm           x -> xn                          (fp32 statistics)
//   2. GEMM + bias         xn @ fc1^T + b1 (at::addmm: cuBLASLt's bias epilogue); gated, one
//                          GEMM for both halves of fc1: (rows, 2H)
//   3. activation          in place on the (rows, H) hidden; gated, act(h[:, :H]) * h[:, H:]
//                          into a new (rows, H) (one read of both halves, one write)
//   4. inner LayerNorm     over the H hidden channels, when the block has one
//   5. GEMM                hidden @ fc2^T
//   6. epilogue            out = x + gamma * (y + fc2_bias)
// cuBLASLt's GELU epilogue is the tanh approximation only, and has no SiLU, QuickGELU or gate
// product, so step 3 is ours for every activation.
// The row kernels move 16-byte packs (8 x bf16) wherever the data is 16-byte aligned.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "../functional_from_out.h"
#include "../mlp_block.h"
#include "row_kernels.cuh"

namespace dcvit {
namespace {

// The activations in fp32, as timm defines them (nn.GELU, GELU(approximate="tanh"),
// QuickGELU, nn.SiLU).
template <Activation ACT>
__device__ __forceinline__ float activate(float v) {
  if constexpr (ACT == Activation::kGelu) {
    return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
  } else if constexpr (ACT == Activation::kGeluTanh) {
    return 0.5f * v * (1.f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
  } else if constexpr (ACT == Activation::kQuickGelu) {
    return v / (1.f + expf(-1.702f * v));
  } else {
    return v / (1.f + expf(-v));
  }
}

// Runs f(std::integral_constant<Activation, act>{}): one kernel instance per activation.
template <typename F>
void with_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::kGelu: f(std::integral_constant<Activation, Activation::kGelu>{}); break;
    case Activation::kGeluTanh: f(std::integral_constant<Activation, Activation::kGeluTanh>{}); break;
    case Activation::kQuickGelu: f(std::integral_constant<Activation, Activation::kQuickGelu>{}); break;
    case Activation::kSilu: f(std::integral_constant<Activation, Activation::kSilu>{}); break;
  }
}

// The activation in place over `numel` contiguous elements of a 16-byte-aligned buffer:
// 16-byte packs, grid-stride with a 64-bit pack index (no division), then the last
// numel % VEC (< VEC) elements by the first threads.
template <typename scalar_t, Activation ACT>
__global__ void activation_kernel(scalar_t* __restrict__ h, int64_t numel) {
  constexpr int VEC = kVec16<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  P* hp = reinterpret_cast<P*>(h);
  const int64_t packs = numel / VEC;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = first; i < packs; i += stride) {
    P p = hp[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) p.v[j] = static_cast<scalar_t>(activate<ACT>(static_cast<float>(p.v[j])));
    hp[i] = p;
  }
  const int64_t tail = packs * VEC + first;
  if (tail < numel) h[tail] = static_cast<scalar_t>(activate<ACT>(static_cast<float>(h[tail])));
}

// Gated MLP: y (rows, H) = act(h[:, :H]) * h[:, H:] for contiguous h (rows, 2H), in fp32 and
// rounded once. VEC elements a thread step (16-byte packs where rows allow, else 1); the
// grid strides over (row, pack) with one division per step.
template <typename scalar_t, Activation ACT, int VEC>
__global__ void gate_kernel(const scalar_t* __restrict__ h, scalar_t* __restrict__ y, int64_t rows,
                            int64_t hidden) {
  using P = Pack<scalar_t, VEC>;
  const int64_t packs = hidden / VEC;
  const int64_t total = rows * packs;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total; i += stride) {
    const int64_t r = i / packs;
    const int64_t c = (i - r * packs) * VEC;
    const scalar_t* row = h + r * 2 * hidden;
    const P gate = *reinterpret_cast<const P*>(row + c);
    const P value = *reinterpret_cast<const P*>(row + hidden + c);
    P o;
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      o.v[j] = static_cast<scalar_t>(activate<ACT>(static_cast<float>(gate.v[j])) *
                                     static_cast<float>(value.v[j]));
    *reinterpret_cast<P*>(y + r * hidden + c) = o;
  }
}

// act in place on the contiguous (rows, H) hidden.
void activate_hidden(at::Tensor& hidden, Activation act, cudaStream_t stream) {
  const int64_t numel = hidden.numel();
  if (numel == 0) return;
  TORCH_CHECK(aligned16(hidden.data_ptr()), "mlp_block (cuda): hidden buffer not 16-byte aligned");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "mlp_block_act", [&] {
    with_activation(act, [&](auto tag) {
      // at least VEC threads, so the tail (< VEC elements) has a thread per element
      activation_kernel<scalar_t, decltype(tag)::value>
          <<<elementwise_blocks(std::max<int64_t>(numel / kVec16<scalar_t>, 1)), kElementwiseThreads, 0,
             stream>>>(hidden.data_ptr<scalar_t>(), numel);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// act(h[:, :H]) * h[:, H:] into a new contiguous (rows, H).
at::Tensor gate_hidden(const at::Tensor& h, Activation act, cudaStream_t stream) {
  const int64_t rows = h.size(0), hidden = h.size(1) / 2;
  at::Tensor y = at::empty({rows, hidden}, h.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "mlp_block_gate", [&] {
    with_activation(act, [&](auto tag) {
      constexpr Activation ACT = decltype(tag)::value;
      constexpr int VEC = kVec16<scalar_t>;
      const scalar_t* hp = h.data_ptr<scalar_t>();
      scalar_t* yp = y.data_ptr<scalar_t>();
      // both halves of every row and every output row start on 16 bytes when H % VEC == 0
      if (rows_vectorizable<scalar_t>(hidden, {hp, yp})) {
        gate_kernel<scalar_t, ACT, VEC>
            <<<elementwise_blocks(rows * hidden / VEC), kElementwiseThreads, 0, stream>>>(hp, yp, rows, hidden);
      } else {
        gate_kernel<scalar_t, ACT, 1>
            <<<elementwise_blocks(rows * hidden), kElementwiseThreads, 0, stream>>>(hp, yp, rows, hidden);
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

at::Tensor& mlp_block_out_cuda(const at::Tensor& x, const at::Tensor& norm_weight,
                               const at::Tensor& norm_bias, const at::Tensor& fc1_weight,
                               const at::Tensor& fc1_bias, const at::Tensor& fc2_weight,
                               const at::Tensor& fc2_bias, double eps,
                               const std::optional<at::Tensor>& gamma, c10::string_view act_name,
                               bool gated, const std::optional<at::Tensor>& inner_norm_weight,
                               const std::optional<at::Tensor>& inner_norm_bias, at::Tensor& out) {
  check_mlp_block_args(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                       gamma, gated, inner_norm_weight, inner_norm_bias, out);
  const Activation act = parse_activation(act_name);
  TORCH_CHECK(x.is_cuda(), "mlp_block (cuda): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t dim = x.size(-1);
  const at::Tensor rows_in = x.reshape({-1, dim}).contiguous();
  const int64_t rows = rows_in.size(0);
  if (rows == 0) return out;
  const at::Tensor normed = layer_norm_rows(rows_in, norm_weight, norm_bias, eps);
  at::Tensor hidden = at::addmm(fc1_bias, normed, fc1_weight.t());
  if (gated) {
    hidden = gate_hidden(hidden, act, stream);
  } else {
    activate_hidden(hidden, act, stream);  // the caching allocator's buffers are aligned
  }
  if (inner_norm_weight.has_value()) {
    hidden = layer_norm_rows(hidden, *inner_norm_weight, *inner_norm_bias, eps);
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
