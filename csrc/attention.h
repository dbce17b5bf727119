// The attention block with pruned heads and channels:
//   out = x + gamma * proj(MHA(LayerNorm(x)))      (gamma: LayerScale, optional)
// Head h attends with softmax(scale * q_h k_h^T + key_bias[b]) v_h; q_h, k_h have width
// qk_dims[h], v_h width v_dims[h]. qkv rows are packed [q_0|q_1|..|k_0|k_1|..|v_0|v_1|..].
// Shared declarations of the CPU (attention.cpp) and CUDA (cuda/attention.cu) impls.
#pragma once
#include <ATen/ATen.h>
#include <optional>

namespace dcvit {

// Checks shapes, dtypes and devices of every argument; raises with a message that names
// the argument.
void check_attention_block_args(const at::Tensor& x, const at::Tensor& norm_weight,
                                const at::Tensor& norm_bias, const at::Tensor& qkv_weight,
                                const std::optional<at::Tensor>& qkv_bias,
                                const at::Tensor& proj_weight,
                                const std::optional<at::Tensor>& proj_bias,
                                at::IntArrayRef qk_dims, at::IntArrayRef v_dims,
                                const std::optional<at::Tensor>& gamma,
                                const std::optional<at::Tensor>& key_bias, const at::Tensor& out);

// The output of dcvit::attention_block for these arguments: contiguous, shaped and typed
// like x (see functional_from_out.h).
at::Tensor attention_block_outputs(const at::Tensor& x, const at::Tensor& norm_weight,
                                   const at::Tensor& norm_bias, const at::Tensor& qkv_weight,
                                   const std::optional<at::Tensor>& qkv_bias,
                                   const at::Tensor& proj_weight,
                                   const std::optional<at::Tensor>& proj_bias,
                                   at::IntArrayRef qk_dims, at::IntArrayRef v_dims, double scale,
                                   double eps, const std::optional<at::Tensor>& gamma,
                                   const std::optional<at::Tensor>& key_bias);

// The attention core on packed qkv (B, N, 2*sum(qk_dims)+sum(v_dims)) -> context
// (B, N, sum(v_dims)), heads concatenated in order. Heads whose q/k widths round up to the
// same multiple of 16 run as one batched at::scaled_dot_product_attention call, zero-padded
// to the group's widest q/k and v (so it works on any device, and a block pruned per head
// costs a few calls, not one per head).
at::Tensor attention_context(const at::Tensor& qkv, at::IntArrayRef qk_dims,
                             at::IntArrayRef v_dims, double scale,
                             const std::optional<at::Tensor>& key_bias);

}  // namespace dcvit
