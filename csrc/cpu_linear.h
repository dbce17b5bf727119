// Linear layers of the CPU impls through oneDNN's fused matmul (mkldnn::_linear_pointwise,
// the op Inductor's CPU backend uses): bias, exact-erf GELU and the residual add run as
// epilogues of the matmul, so no separate bias-broadcast copy, GELU pass or add pass is made.
// On this project's AMD CPUs ATen's own fp32 linear goes to MKL, which runs about half as fast
// as oneDNN there; bf16 uses the CPU's native bf16 dot products (AVX512-BF16 or AMX).
// Each whole weight tensor is packed once into oneDNN's blocked layout
// (mkldnn::_reorder_linear_weight) on its first use and reused while it lives unchanged.
#pragma once
#include <ATen/ATen.h>
#include <optional>

namespace dcvit {

// Whether the fused oneDNN linears take this dtype on this CPU (fp32 always when oneDNN is
// built in; bf16 only with native bf16 instructions; fp16 never).
bool cpu_fused_linear_ok(at::ScalarType dtype);

// The unary epilogues the MLP's activations map to: oneDNN's exact (erf) GELU, tanh GELU and
// swish (SiLU). QuickGELU, x * sigmoid(1.702 x), is swish with alpha 1.702, which the mkldnn
// op does not take (its "swish" has no scalars): its callers run it as a pass of their own.
enum class LinearEpilogue { kNone, kGelu, kGeluTanh, kSilu };

// epilogue(x @ w^T + b) for x (M, K), w (N, K).
at::Tensor cpu_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                      LinearEpilogue epilogue);

// act(x @ w^T + b) with act none or exact (erf) GELU.
inline at::Tensor cpu_linear(const at::Tensor& x, const at::Tensor& w,
                             const std::optional<at::Tensor>& b, bool gelu) {
  return cpu_linear(x, w, b, gelu ? LinearEpilogue::kGelu : LinearEpilogue::kNone);
}

// (x @ w^T + b) * other for x (M, K), w (N, K), other (M, N): the gate product of a gated MLP
// as the GEMM's binary epilogue.
at::Tensor cpu_linear_mul(const at::Tensor& x, const at::Tensor& w,
                          const std::optional<at::Tensor>& b, const at::Tensor& other);

// x @ w^T + b + residual for x (M, K), w (N, K), residual (M, N) contiguous.
at::Tensor cpu_linear_add(const at::Tensor& x, const at::Tensor& w,
                          const std::optional<at::Tensor>& b, const at::Tensor& residual);

}  // namespace dcvit
