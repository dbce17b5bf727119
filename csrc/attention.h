// The attention block with pruned heads and channels:
//   out = x + gamma * proj(MHA(LayerNorm(x)))      (gamma: LayerScale, optional)
// Head h attends with softmax(scale * q_h k_h^T + key_bias[b]) v_h; q_h, k_h have width
// qk_dims[h], v_h width v_dims[h]. qkv rows are packed [q_0|q_1|..|k_0|k_1|..|v_0|v_1|..].
// timm's EvaAttention parts, all optional: q/k-norm (a LayerNorm over each head's q and k,
// one weight for every head), rotary position embedding on q and k after it (float tables
// (P, sum(qk_dims)) in the packed q channel layout, rope_index (B, N) the row of each token,
// else row t for token t; channel i < d/2 of a head pairs with i + d/2), and the inner norm
// over the concatenated context before proj. See kernels/head_norm_rope.py.
// Shared declarations of the CPU (attention.cpp) and CUDA (cuda/attention.cu) impls.
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <tuple>

namespace dcvit {

// The schema's optional EvaAttention arguments, bundled for the helpers below.
struct EvaParts {
  const std::optional<at::Tensor>& q_norm_weight;
  const std::optional<at::Tensor>& q_norm_bias;
  const std::optional<at::Tensor>& k_norm_weight;
  const std::optional<at::Tensor>& k_norm_bias;
  const std::optional<at::Tensor>& rope_cos;
  const std::optional<at::Tensor>& rope_sin;
  const std::optional<at::Tensor>& rope_index;
  const std::optional<at::Tensor>& inner_norm_weight;
  const std::optional<at::Tensor>& inner_norm_bias;
};

// Checks shapes, dtypes and devices of every argument; raises with a message that names
// the argument.
void check_attention_block_args(const at::Tensor& x, const at::Tensor& norm_weight,
                                const at::Tensor& norm_bias, const at::Tensor& qkv_weight,
                                const std::optional<at::Tensor>& qkv_bias,
                                const at::Tensor& proj_weight,
                                const std::optional<at::Tensor>& proj_bias,
                                at::IntArrayRef qk_dims, at::IntArrayRef v_dims,
                                const std::optional<at::Tensor>& gamma,
                                const std::optional<at::Tensor>& key_bias,
                                const EvaParts& eva, const at::Tensor& out);

// The output of dcvit::attention_block for these arguments: contiguous, shaped and typed
// like x (see functional_from_out.h).
at::Tensor attention_block_outputs(const at::Tensor& x, const at::Tensor& norm_weight,
                                   const at::Tensor& norm_bias, const at::Tensor& qkv_weight,
                                   const std::optional<at::Tensor>& qkv_bias,
                                   const at::Tensor& proj_weight,
                                   const std::optional<at::Tensor>& proj_bias,
                                   at::IntArrayRef qk_dims, at::IntArrayRef v_dims, double scale,
                                   double eps, const std::optional<at::Tensor>& gamma,
                                   const std::optional<at::Tensor>& key_bias,
                                   const std::optional<at::Tensor>& q_norm_weight,
                                   const std::optional<at::Tensor>& q_norm_bias,
                                   const std::optional<at::Tensor>& k_norm_weight,
                                   const std::optional<at::Tensor>& k_norm_bias,
                                   const std::optional<at::Tensor>& rope_cos,
                                   const std::optional<at::Tensor>& rope_sin,
                                   const std::optional<at::Tensor>& rope_index,
                                   const std::optional<at::Tensor>& inner_norm_weight,
                                   const std::optional<at::Tensor>& inner_norm_bias);

// dcvit::attention_block_key_mean: attention_block's output and ToMe's merge metric from
// the keys the block computes (after q/k-norm; RoPE is refused: merges and RoPE do not
// meet): k averaged over heads, (B, N, qk_dims[0]), when every head has one q/k width, else
// the heads' k side by side, (B, N, sum(qk_dims)) (reference.merge_metric's form).
int64_t key_mean_width(at::IntArrayRef qk_dims);
std::tuple<at::Tensor, at::Tensor> attention_block_key_mean_outputs(
    const at::Tensor& x, const at::Tensor& norm_weight, const at::Tensor& norm_bias,
    const at::Tensor& qkv_weight, const std::optional<at::Tensor>& qkv_bias,
    const at::Tensor& proj_weight, const std::optional<at::Tensor>& proj_bias,
    at::IntArrayRef qk_dims, at::IntArrayRef v_dims, double scale, double eps,
    const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& key_bias,
    const std::optional<at::Tensor>& q_norm_weight, const std::optional<at::Tensor>& q_norm_bias,
    const std::optional<at::Tensor>& k_norm_weight, const std::optional<at::Tensor>& k_norm_bias,
    const std::optional<at::Tensor>& rope_cos, const std::optional<at::Tensor>& rope_sin,
    const std::optional<at::Tensor>& rope_index, const std::optional<at::Tensor>& inner_norm_weight,
    const std::optional<at::Tensor>& inner_norm_bias);
// Refuses RoPE and a key_mean_out of the wrong shape, dtype, device or layout.
void check_key_mean_args(const at::Tensor& x, at::IntArrayRef qk_dims, const EvaParts& eva,
                         const at::Tensor& key_mean);
// Writes the metric of the packed qkv (B, N, C) (after q/k-norm) into key_mean.
void write_key_mean(const at::Tensor& qkv, at::IntArrayRef qk_dims, at::Tensor& key_mean);

// The attention core on packed qkv (B, N, 2*sum(qk_dims)+sum(v_dims)) -> context
// (B, N, sum(v_dims)), heads concatenated in order. Heads whose q/k widths round up to the
// same multiple of 16 run as one batched at::scaled_dot_product_attention call, zero-padded
// to the group's widest q/k and v (so it works on any device, and a block pruned per head
// costs a few calls, not one per head).
at::Tensor attention_context(const at::Tensor& qkv, at::IntArrayRef qk_dims,
                             at::IntArrayRef v_dims, double scale,
                             const std::optional<at::Tensor>& key_bias);

// qkv (B, N, C) with q/k-norm and RoPE applied to its q and k columns (a new tensor), or qkv
// itself when `eva` has neither.
at::Tensor apply_qk_norm_rope(const at::Tensor& qkv, at::IntArrayRef qk_dims, double eps,
                              const EvaParts& eva);

// ctx (B, N, sum(v_dims)) through the inner norm when `eva` has one, else ctx.
at::Tensor apply_inner_norm(const at::Tensor& ctx, double eps, const EvaParts& eva);

}  // namespace dcvit
