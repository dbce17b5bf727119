// The MLP-only block that DC-ViT leaves where it removes attention (and every block's MLP half):
//   y = x + gamma * fc2(inner_norm(act(fc1(LayerNorm(x)))))   (gamma: LayerScale, optional)
// act: exact GELU, tanh GELU, QuickGELU x * sigmoid(1.702 x) or SiLU. Gated (timm GluMlp /
// SwiGLU): fc1 is (2H, D), rows [0, H) activated and [H, 2H) linear, and fc2 (D, H) gets
// act(first) * second. inner_norm: optional LayerNorm over the H hidden channels (same eps).
// Shared declarations of the CPU (mlp_block.cpp) and CUDA (cuda/mlp_block.cu) impls.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/string_view.h>
#include <optional>

namespace dcvit {

enum class Activation { kGelu, kGeluTanh, kQuickGelu, kSilu };

// The schema's `act` string ("gelu", "gelu_tanh", "quick_gelu", "silu"); raises naming the choices.
Activation parse_activation(c10::string_view act);

// Checks shapes, dtypes and devices of every argument; raises with a message that
// names the argument.
void check_mlp_block_args(const at::Tensor& x, const at::Tensor& norm_weight,
                          const at::Tensor& norm_bias, const at::Tensor& fc1_weight,
                          const at::Tensor& fc1_bias, const at::Tensor& fc2_weight,
                          const at::Tensor& fc2_bias, const std::optional<at::Tensor>& gamma,
                          bool gated, const std::optional<at::Tensor>& inner_norm_weight,
                          const std::optional<at::Tensor>& inner_norm_bias, const at::Tensor& out);

// The output of dcvit::mlp_block for these arguments: contiguous, shaped and typed like x
// (see functional_from_out.h).
at::Tensor mlp_block_outputs(const at::Tensor& x, const at::Tensor& norm_weight,
                             const at::Tensor& norm_bias, const at::Tensor& fc1_weight,
                             const at::Tensor& fc1_bias, const at::Tensor& fc2_weight,
                             const at::Tensor& fc2_bias, double eps,
                             const std::optional<at::Tensor>& gamma, c10::string_view act,
                             bool gated, const std::optional<at::Tensor>& inner_norm_weight,
                             const std::optional<at::Tensor>& inner_norm_bias);

}  // namespace dcvit
