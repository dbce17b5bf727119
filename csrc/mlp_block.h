// The MLP-only block that DC-ViT leaves where it removes attention:
//   y = x + gamma * fc2(GELU(fc1(LayerNorm(x))))      (gamma: LayerScale, optional)
// Shared declarations of the CPU (mlp_block.cpp) and CUDA (cuda/mlp_block.cu) impls.
#pragma once
#include <ATen/ATen.h>
#include <optional>

namespace dcvit {

// Checks shapes, dtypes and devices of every argument; raises with a message that
// names the argument. Returns (rows, embed dim, hidden width).
void check_mlp_block_args(const at::Tensor& x, const at::Tensor& norm_weight,
                          const at::Tensor& norm_bias, const at::Tensor& fc1_weight,
                          const at::Tensor& fc1_bias, const at::Tensor& fc2_weight,
                          const at::Tensor& fc2_bias, const std::optional<at::Tensor>& gamma,
                          const at::Tensor& out);

// The output of dcvit::mlp_block for these arguments: contiguous, shaped and typed like x
// (see functional_from_out.h).
at::Tensor mlp_block_outputs(const at::Tensor& x, const at::Tensor& norm_weight,
                             const at::Tensor& norm_bias, const at::Tensor& fc1_weight,
                             const at::Tensor& fc1_bias, const at::Tensor& fc2_weight,
                             const at::Tensor& fc2_bias, double eps,
                             const std::optional<at::Tensor>& gamma);

}  // namespace dcvit
