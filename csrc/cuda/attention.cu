// CUDA implementation of dcvit::attention_block (see ../attention.h).
//
//   1. LayerNorm           x -> xn                             (our kernel, fp32 statistics)
//   2. GEMM                qkv = xn @ qkv_weight^T (+ bias)    (cuBLAS(Lt) via at::addmm/at::mm)
//   2b. q/k-norm, RoPE     on q and k when given (apply_qk_norm_rope in ../attention.cpp)
//   2c. merge metric      k averaged over heads (attention_block_key_mean only)
//   3. attention core      heads grouped by q/k width rounded up to 16 (attention_context in
//                          ../attention.cpp), one batched at::scaled_dot_product_attention
//                          call per group (flash / memory-efficient / cuDNN kernels as PyTorch
//                          picks; the key bias is an additive (B, 1, 1, N) mask)
//   3b. inner norm         LayerNorm over the context when given (timm's attn.norm)
//   4. GEMM                ctx @ proj_weight^T                 (cuBLAS via at::mm)
//   5. epilogue            out = x + gamma * (y + proj_bias)   (our kernel)
// Pruned heads and channels shrink every step: the GEMMs' widths, the number of heads per
// SDPA call and their head widths. Heads pruned one by one (UVC) cost one SDPA call per
// padded width (at most 4 for heads up to 64 wide), never one per head; build_engine's
// zero-padded heads (multiples of 16) make those groups views without copies when adjacent.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../attention.h"
#include "../functional_from_out.h"
#include "row_kernels.cuh"

namespace dcvit {
namespace {

at::Tensor& attention_block_cuda(at::Tensor* key_mean, const at::Tensor& x, const at::Tensor& norm_weight,
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
                                     const std::optional<at::Tensor>& inner_norm_bias,
                                     at::Tensor& out) {
  const EvaParts eva{q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, rope_cos,
                     rope_sin,      rope_index,  inner_norm_weight, inner_norm_bias};
  check_attention_block_args(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight,
                             proj_bias, qk_dims, v_dims, gamma, key_bias, eva, out);
  TORCH_CHECK(x.is_cuda(), "attention_block (cuda): x must be a CUDA tensor");
  if (key_mean) check_key_mean_args(x, qk_dims, eva, *key_mean);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t batch = x.size(0), tokens = x.size(1), dim = x.size(2);
  const at::Tensor rows_in = x.reshape({-1, dim}).contiguous();
  if (rows_in.size(0) == 0) return out;

  const at::Tensor normed = layer_norm_rows(rows_in, norm_weight, norm_bias, eps);
  const at::Tensor qkv_rows = qkv_bias.has_value()
                                  ? at::addmm(*qkv_bias, normed, qkv_weight.t())
                                  : at::mm(normed, qkv_weight.t());
  const at::Tensor qkv = apply_qk_norm_rope(qkv_rows.view({batch, tokens, -1}), qk_dims, eps, eva);
  if (key_mean) write_key_mean(qkv, qk_dims, *key_mean);
  const at::Tensor ctx =
      apply_inner_norm(attention_context(qkv, qk_dims, v_dims, scale, key_bias), eps, eva);
  const at::Tensor branch = at::mm(ctx.reshape({batch * tokens, -1}), proj_weight.t());
  at::Tensor rows_out = out.view({-1, dim});
  residual_epilogue(rows_in, branch, proj_bias, gamma, rows_out);
  return out;
}

at::Tensor& attention_block_out_cuda(
    const at::Tensor& x, const at::Tensor& norm_weight, const at::Tensor& norm_bias,
    const at::Tensor& qkv_weight, const std::optional<at::Tensor>& qkv_bias,
    const at::Tensor& proj_weight, const std::optional<at::Tensor>& proj_bias,
    at::IntArrayRef qk_dims, at::IntArrayRef v_dims, double scale, double eps,
    const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& key_bias,
    const std::optional<at::Tensor>& q_norm_weight, const std::optional<at::Tensor>& q_norm_bias,
    const std::optional<at::Tensor>& k_norm_weight, const std::optional<at::Tensor>& k_norm_bias,
    const std::optional<at::Tensor>& rope_cos, const std::optional<at::Tensor>& rope_sin,
    const std::optional<at::Tensor>& rope_index, const std::optional<at::Tensor>& inner_norm_weight,
    const std::optional<at::Tensor>& inner_norm_bias,
    at::Tensor& out) {
  return attention_block_cuda(nullptr, x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias,
                              qk_dims, v_dims, scale, eps, gamma, key_bias, q_norm_weight, q_norm_bias,
                              k_norm_weight, k_norm_bias, rope_cos, rope_sin, rope_index,
                              inner_norm_weight, inner_norm_bias, out);
}

std::tuple<at::Tensor&, at::Tensor&> attention_block_key_mean_out_cuda(
    const at::Tensor& x, const at::Tensor& norm_weight, const at::Tensor& norm_bias,
    const at::Tensor& qkv_weight, const std::optional<at::Tensor>& qkv_bias,
    const at::Tensor& proj_weight, const std::optional<at::Tensor>& proj_bias,
    at::IntArrayRef qk_dims, at::IntArrayRef v_dims, double scale, double eps,
    const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& key_bias,
    const std::optional<at::Tensor>& q_norm_weight, const std::optional<at::Tensor>& q_norm_bias,
    const std::optional<at::Tensor>& k_norm_weight, const std::optional<at::Tensor>& k_norm_bias,
    const std::optional<at::Tensor>& rope_cos, const std::optional<at::Tensor>& rope_sin,
    const std::optional<at::Tensor>& rope_index, const std::optional<at::Tensor>& inner_norm_weight,
    const std::optional<at::Tensor>& inner_norm_bias,
    at::Tensor& out, at::Tensor& key_mean_out) {
  attention_block_cuda(&key_mean_out, x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias,
                              qk_dims, v_dims, scale, eps, gamma, key_bias, q_norm_weight, q_norm_bias,
                              k_norm_weight, k_norm_bias, rope_cos, rope_sin, rope_index,
                              inner_norm_weight, inner_norm_bias, out);
  return {out, key_mean_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(dcvit, CUDA, m) {
  impl_with_out<&attention_block_outputs, &attention_block_out_cuda>(m, "attention_block");
  impl_with_out<&attention_block_key_mean_outputs, &attention_block_key_mean_out_cuda>(
      m, "attention_block_key_mean");
}

}  // namespace dcvit
