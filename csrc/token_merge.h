// Token merging ops shared by the CPU (token_merge.cpp) and CUDA (cuda/token_merge.cu) impls:
//   dcvit::tome_merge   ToMe's bipartite soft matching + size-weighted average (merge_wavg)
//   dcvit::atme_merge   CAIT's grid-preserving asymmetric merge of neighbour pairs
//   dcvit::atme_unmerge copies each merged token back to both grid positions
// The exact definitions are in kernels/token_merge.py (the *_ref functions).
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <tuple>

namespace dcvit {

// Cosine similarity of an ATME pair: dot / max(|a| |b|, kCosineEps); zero vectors give 0.
constexpr double kCosineEps = 1e-12;

// ToMe's clamp of r: at most half of the unprotected (class/distillation) tokens merge.
int64_t tome_effective_r(int64_t tokens, int64_t r, bool class_token, bool distill_token);

// Checks x (B, N, C), metric (B, N, Cm) of x's dtype and device, size (B, N, 1) or none,
// r >= 0; returns the effective r. Messages name the argument.
int64_t check_tome_merge_inputs(const at::Tensor& x, const at::Tensor& metric, int64_t r,
                                const std::optional<at::Tensor>& size, bool class_token,
                                bool distill_token);

// A ToMe merge as a gather: output token i of batch b is the size-weighted average of
// token primary[b, i] and tokens sources[b, begin[b, i] : begin[b, i] + count[b, i]].
// All int32; primary/begin/count are (B, N - r), sources (B, r). Output order is ToMe's:
// the kept A tokens (in token order with a class token, else in score order), then the B
// tokens; with a distillation token, class token, distillation token, then the rest.
// Built by the CPU impl from a BLAS score matrix and by the CUDA impl in three kernels.
struct TomePlan {
  at::Tensor primary, begin, count, sources;
};

// Checks the out buffers: contiguous, x's dtype and device, the given token count.
void check_merge_outputs(const char* op, const at::Tensor& x, int64_t out_tokens,
                         const at::Tensor& out, const at::Tensor* size_out);

struct AtmeLayout {
  int64_t rows, cols;          // grid before the merge
  int64_t out_rows, out_cols;  // grid after: one axis halved (ceil)
  int64_t prefix;              // protected prefix tokens
  bool axis_w;                 // true: pairs along a row; false: pairs of rows
  int64_t out_tokens() const { return prefix + out_rows * out_cols; }
  int64_t in_tokens() const { return prefix + rows * cols; }
};

// Validates grid/axis/prefix against x's token count (`merged`: x is already merged).
AtmeLayout atme_layout(const char* op, const at::Tensor& x, int64_t grid_h, int64_t grid_w,
                       c10::string_view axis, int64_t num_prefix_tokens, bool merged);

// Checks metric (x's dtype/device, same B and N) and size (B, N, 1) or none.
void check_atme_merge_inputs(const at::Tensor& x, const at::Tensor& metric,
                             const std::optional<at::Tensor>& size);

// The outputs of each op for these arguments, allocated for its CPU and CUDA out kernels
// (see functional_from_out.h): (x, size) of the merged token count, the restored grid's x.
std::tuple<at::Tensor, at::Tensor> tome_merge_outputs(
    const at::Tensor& x, const at::Tensor& metric, int64_t r, const std::optional<at::Tensor>& size,
    bool class_token, bool distill_token);
std::tuple<at::Tensor, at::Tensor> atme_merge_outputs(
    const at::Tensor& x, const at::Tensor& metric, int64_t grid_h, int64_t grid_w,
    c10::string_view axis, int64_t num_prefix_tokens, const std::optional<at::Tensor>& size);
at::Tensor atme_unmerge_outputs(const at::Tensor& x, int64_t grid_h, int64_t grid_w,
                                c10::string_view axis, int64_t num_prefix_tokens);

}  // namespace dcvit
