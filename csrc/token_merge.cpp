// Schemas of the token merging ops and their CPU implementations (see token_merge.h).
#include "token_merge.h"

#include "functional_from_out.h"
#include "op_schema.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace dcvit {

int64_t tome_effective_r(int64_t tokens, int64_t r, bool class_token, bool distill_token) {
  const int64_t protected_tokens = static_cast<int64_t>(class_token) + distill_token;
  return std::max<int64_t>(0, std::min(r, (tokens - protected_tokens) / 2));
}

namespace {

void check_tokens_tensor(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must be (B, N, C), got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be floating point, got ", t.scalar_type());
}

void check_like_x(const char* op, const char* name, const at::Tensor& x, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but x has ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
}

void check_metric_and_size(const char* op, const at::Tensor& x, const at::Tensor& metric,
                           const std::optional<at::Tensor>& size) {
  check_tokens_tensor(op, "x", x);
  check_tokens_tensor(op, "metric", metric);
  TORCH_CHECK(metric.size(0) == x.size(0) && metric.size(1) == x.size(1), op,
              ": metric must be (B, N, Cm) with x's B and N ", x.sizes().slice(0, 2), ", got ",
              metric.sizes());
  TORCH_CHECK(metric.size(2) >= 1, op, ": metric needs at least one channel");
  check_like_x(op, "metric", x, metric);
  if (size.has_value()) {
    TORCH_CHECK(size->dim() == 3 && size->size(0) == x.size(0) && size->size(1) == x.size(1) &&
                    size->size(2) == 1,
                op, ": size must be (B, N, 1) = (", x.size(0), ", ", x.size(1), ", 1), got ",
                size->sizes());
    check_like_x(op, "size", x, *size);
  }
}

}  // namespace

int64_t check_tome_merge_inputs(const at::Tensor& x, const at::Tensor& metric, int64_t r,
                                const std::optional<at::Tensor>& size, bool class_token,
                                bool distill_token) {
  check_metric_and_size("tome_merge", x, metric, size);
  TORCH_CHECK(r >= 0, "tome_merge: r must be >= 0, got ", r);
  TORCH_CHECK(!distill_token || class_token,
              "tome_merge: distill_token needs class_token (the distillation token follows it)");
  return tome_effective_r(x.size(1), r, class_token, distill_token);
}

void check_merge_outputs(const char* op, const at::Tensor& x, int64_t out_tokens,
                         const at::Tensor& out, const at::Tensor* size_out) {
  TORCH_CHECK(out.dim() == 3 && out.size(0) == x.size(0) && out.size(1) == out_tokens &&
                  out.size(2) == x.size(2) && out.is_contiguous(),
              op, ": out must be contiguous (", x.size(0), ", ", out_tokens, ", ", x.size(2),
              "), got ", out.sizes());
  check_like_x(op, "out", x, out);
  if (size_out != nullptr) {
    TORCH_CHECK(size_out->dim() == 3 && size_out->size(0) == x.size(0) &&
                    size_out->size(1) == out_tokens && size_out->size(2) == 1 &&
                    size_out->is_contiguous(),
                op, ": size_out must be contiguous (", x.size(0), ", ", out_tokens, ", 1), got ",
                size_out->sizes());
    check_like_x(op, "size_out", x, *size_out);
  }
}

AtmeLayout atme_layout(const char* op, const at::Tensor& x, int64_t grid_h, int64_t grid_w,
                       c10::string_view axis, int64_t num_prefix_tokens, bool merged) {
  check_tokens_tensor(op, "x", x);
  TORCH_CHECK(axis == "w" || axis == "h", op, ": axis must be 'w' or 'h', got '", axis, "'");
  TORCH_CHECK(grid_h >= 1 && grid_w >= 1, op, ": grid must be positive, got (", grid_h, ", ",
              grid_w, ")");
  TORCH_CHECK(num_prefix_tokens >= 0, op, ": num_prefix_tokens must be >= 0, got ",
              num_prefix_tokens);
  AtmeLayout layout{grid_h, grid_w, grid_h, grid_w, num_prefix_tokens, axis == "w"};
  const int64_t halved = layout.axis_w ? grid_w : grid_h;
  TORCH_CHECK(halved >= 2, op, ": cannot halve axis '", axis, "' of grid (", grid_h, ", ", grid_w,
              ")");
  if (layout.axis_w) {
    layout.out_cols = (grid_w + 1) / 2;
  } else {
    layout.out_rows = (grid_h + 1) / 2;
  }
  const int64_t expected = merged ? layout.out_tokens() : layout.in_tokens();
  TORCH_CHECK(x.size(1) == expected, op, ": x has ", x.size(1), " tokens but ",
              num_prefix_tokens, " prefix tokens + the ",
              merged ? "merged grid of grid " : "grid ", "(", grid_h, ", ", grid_w, ") need ",
              expected);
  return layout;
}

void check_atme_merge_inputs(const at::Tensor& x, const at::Tensor& metric,
                             const std::optional<at::Tensor>& size) {
  check_metric_and_size("atme_merge", x, metric, size);
}

std::tuple<at::Tensor, at::Tensor> tome_merge_outputs(
    const at::Tensor& x, const at::Tensor& metric, int64_t r, const std::optional<at::Tensor>& size,
    bool class_token, bool distill_token) {
  const int64_t tokens =
      x.size(1) - check_tome_merge_inputs(x, metric, r, size, class_token, distill_token);
  return {at::empty({x.size(0), tokens, x.size(2)}, x.options()),
          at::empty({x.size(0), tokens, 1}, x.options())};
}

std::tuple<at::Tensor, at::Tensor> atme_merge_outputs(
    const at::Tensor& x, const at::Tensor&, int64_t grid_h, int64_t grid_w, c10::string_view axis,
    int64_t num_prefix_tokens, const std::optional<at::Tensor>&) {
  const AtmeLayout g = atme_layout("atme_merge", x, grid_h, grid_w, axis, num_prefix_tokens, false);
  return {at::empty({x.size(0), g.out_tokens(), x.size(2)}, x.options()),
          at::empty({x.size(0), g.out_tokens(), 1}, x.options())};
}

at::Tensor atme_unmerge_outputs(const at::Tensor& x, int64_t grid_h, int64_t grid_w,
                                c10::string_view axis, int64_t num_prefix_tokens) {
  const AtmeLayout g = atme_layout("atme_unmerge", x, grid_h, grid_w, axis, num_prefix_tokens, true);
  return at::empty({x.size(0), g.in_tokens(), x.size(2)}, x.options());
}

namespace {

// ---- ToMe ----------------------------------------------------------------------------------

// ToMe's selection for one batch element from its (Na, Nb) cosine scores, written into the
// plan rows of that element (see TomePlan).
template <typename score_t>
void plan_from_scores(const score_t* scores, int64_t num_a, int64_t num_b, int64_t r,
                      bool class_token, bool distill_token, int32_t* primary, int32_t* begin,
                      int32_t* count, int32_t* sources) {
  constexpr score_t neg_inf = -std::numeric_limits<score_t>::infinity();
  std::vector<score_t> best(num_a, neg_inf);
  std::vector<int32_t> dst(num_a, 0);
  // the class token never merges: its best is NaN, which sorts last (kernels/token_merge.py)
  if (class_token) best[0] = std::numeric_limits<score_t>::quiet_NaN();
  for (int64_t i = class_token ? 1 : 0; i < num_a; ++i) {
    const score_t* row = scores + i * num_b;
    for (int64_t j = distill_token ? 1 : 0; j < num_b; ++j) {  // nor is the dist token a target
      // strict: the earliest index wins a tie, as torch.max; a NaN score never wins
      if (row[j] > best[i]) {
        best[i] = row[j];
        dst[i] = static_cast<int32_t>(j);
      }
    }
  }
  std::vector<int32_t> edge(num_a);
  std::iota(edge.begin(), edge.end(), 0);
  // descending, NaN last: a strict weak order whatever the scores (a plain '>' is not one
  // with NaN, and std::stable_sort may then read out of bounds)
  std::stable_sort(edge.begin(), edge.end(), [&](int32_t a, int32_t b) {
    return !std::isnan(best[a]) && (std::isnan(best[b]) || best[a] > best[b]);
  });
  // kept A tokens: back in token order only with a class token (ToMe keeps it first)
  if (class_token) std::sort(edge.begin() + r, edge.end());
  // merged tokens listed by destination, then token order
  std::sort(edge.begin(), edge.begin() + r, [&](int32_t a, int32_t b) {
    return dst[a] != dst[b] ? dst[a] < dst[b] : a < b;
  });
  std::vector<int32_t> count_b(num_b, 0);
  for (int64_t k = 0; k < r; ++k) {
    sources[k] = 2 * edge[k];
    ++count_b[dst[edge[k]]];
  }
  const int64_t kept = num_a - r;
  auto put = [&](int64_t slot, int32_t own, int32_t first, int32_t num) {
    primary[slot] = own;
    begin[slot] = first;
    count[slot] = num;
  };
  for (int64_t p = 0; p < kept; ++p) {  // with a distillation token it takes slot 1
    put(distill_token && p > 0 ? p + 1 : p, 2 * edge[r + p], 0, 0);
  }
  int32_t first = 0;
  for (int64_t d = 0; d < num_b; ++d) {
    put(distill_token && d == 0 ? 1 : kept + d, static_cast<int32_t>(2 * d + 1), first, count_b[d]);
    first += count_b[d];
  }
}

// Cosine scores by one BLAS bmm of the L2-normalized metric (fp32, fp64 for double), then
// ToMe's selection per batch element in plain loops.
TomePlan tome_merge_plan_cpu(const at::Tensor& metric, int64_t r, bool class_token,
                             bool distill_token) {
  const int64_t batch = metric.size(0), tokens = metric.size(1);
  const int64_t num_a = (tokens + 1) / 2, num_b = tokens / 2, n_out = tokens - r;
  const auto score_type = metric.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor m = metric.to(score_type);
  // divided by max(|m|, eps), as the other backends: a zero row scores 0
  m = m / at::linalg_vector_norm(m, 2, {-1}, /*keepdim=*/true).clamp_min(kCosineEps);
  const at::Tensor scores =
      at::bmm(m.slice(1, 0, tokens, 2), m.slice(1, 1, tokens, 2).transpose(1, 2)).contiguous();
  const auto int_opts = metric.options().dtype(at::kInt);
  TomePlan plan{at::empty({batch, n_out}, int_opts), at::empty({batch, n_out}, int_opts),
                at::empty({batch, n_out}, int_opts), at::empty({batch, r}, int_opts)};
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "tome_merge_plan_cpu", [&] {
    const scalar_t* s = scores.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        plan_from_scores<scalar_t>(s + b * num_a * num_b, num_a, num_b, r, class_token,
                                   distill_token, plan.primary.data_ptr<int32_t>() + b * n_out,
                                   plan.begin.data_ptr<int32_t>() + b * n_out,
                                   plan.count.data_ptr<int32_t>() + b * n_out,
                                   plan.sources.data_ptr<int32_t>() + b * r);
      }
    });
  });
  return plan;
}

template <typename scalar_t>
void weighted_gather_cpu(const at::Tensor& x, const scalar_t* size, const TomePlan& plan,
                         at::Tensor& out, at::Tensor& size_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tokens = x.size(1), channels = x.size(2), n_out = out.size(1);
  const int64_t r = plan.sources.size(1);
  const scalar_t* xs = x.data_ptr<scalar_t>();
  const int32_t* primary = plan.primary.data_ptr<int32_t>();
  const int32_t* begin = plan.begin.data_ptr<int32_t>();
  const int32_t* count = plan.count.data_ptr<int32_t>();
  const int32_t* sources = plan.sources.data_ptr<int32_t>();
  scalar_t* os = out.data_ptr<scalar_t>();
  scalar_t* ss = size_out.data_ptr<scalar_t>();
  at::parallel_for(0, x.size(0) * n_out, 16, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> acc(channels);
    for (int64_t row = lo; row < hi; ++row) {
      const int64_t b = row / n_out;
      const scalar_t* xb = xs + b * tokens * channels;
      auto size_of = [&](int64_t t) { return size ? acc_t(size[b * tokens + t]) : acc_t(1); };
      const int64_t own = primary[row];
      const scalar_t* own_row = xb + own * channels;
      scalar_t* dst = os + row * channels;
      acc_t total = size_of(own);
      if (count[row] == 0) {  // nothing merged in: copied bit-exactly
        std::copy(own_row, own_row + channels, dst);
        ss[row] = static_cast<scalar_t>(total);
        continue;
      }
      for (int64_t c = 0; c < channels; ++c) acc[c] = acc_t(own_row[c]) * total;
      const int32_t* list = sources + b * r + begin[row];
      for (int64_t k = 0; k < count[row]; ++k) {
        const acc_t s = size_of(list[k]);
        const scalar_t* src_row = xb + list[k] * channels;
        for (int64_t c = 0; c < channels; ++c) acc[c] += acc_t(src_row[c]) * s;
        total += s;
      }
      for (int64_t c = 0; c < channels; ++c) dst[c] = static_cast<scalar_t>(acc[c] / total);
      ss[row] = static_cast<scalar_t>(total);
    }
  });
}

std::tuple<at::Tensor&, at::Tensor&> tome_merge_out_cpu(
    const at::Tensor& x, const at::Tensor& metric, int64_t r, const std::optional<at::Tensor>& size,
    bool class_token, bool distill_token, at::Tensor& out, at::Tensor& size_out) {
  const int64_t eff_r = check_tome_merge_inputs(x, metric, r, size, class_token, distill_token);
  check_merge_outputs("tome_merge", x, x.size(1) - eff_r, out, &size_out);
  TORCH_CHECK(x.device().is_cpu(), "tome_merge (cpu): x must be a CPU tensor");
  if (eff_r == 0) {
    out.copy_(x);
    size.has_value() ? size_out.copy_(*size) : size_out.fill_(1);
    return {out, size_out};
  }
  const TomePlan plan = tome_merge_plan_cpu(metric, eff_r, class_token, distill_token);
  const at::Tensor xc = x.contiguous();
  const at::Tensor sc = size.has_value() ? size->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tome_merge_cpu", [&] {
    weighted_gather_cpu<scalar_t>(xc, size.has_value() ? sc.data_ptr<scalar_t>() : nullptr, plan,
                                  out, size_out);
  });
  return {out, size_out};
}


// ---- ATME ----------------------------------------------------------------------------------

template <typename scalar_t>
void atme_merge_cpu_kernel(const at::Tensor& x, const at::Tensor& metric, const scalar_t* size,
                           const AtmeLayout& g, at::Tensor& out, at::Tensor& size_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tokens = x.size(1), channels = x.size(2), dim_m = metric.size(2);
  const int64_t n_out = g.out_tokens();
  const scalar_t* xs = x.data_ptr<scalar_t>();
  const scalar_t* ms = metric.data_ptr<scalar_t>();
  scalar_t* os = out.data_ptr<scalar_t>();
  scalar_t* ss = size_out.data_ptr<scalar_t>();
  at::parallel_for(0, x.size(0) * n_out, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t row = lo; row < hi; ++row) {
      const int64_t b = row / n_out, o = row % n_out;
      int64_t dst = o, src = -1;
      if (o >= g.prefix) {
        const int64_t i = (o - g.prefix) / g.out_cols, j = (o - g.prefix) % g.out_cols;
        if (g.axis_w) {
          dst = g.prefix + i * g.cols + 2 * j;
          if (2 * j + 1 < g.cols) src = dst + 1;
        } else {
          dst = g.prefix + 2 * i * g.cols + j;
          if (2 * i + 1 < g.rows) src = dst + g.cols;
        }
      }
      auto size_of = [&](int64_t t) { return size ? acc_t(size[b * tokens + t]) : acc_t(1); };
      const scalar_t* x_dst = xs + (b * tokens + dst) * channels;
      scalar_t* out_row = os + row * channels;
      if (src < 0) {  // prefix token or odd last column/row: passes through
        std::copy(x_dst, x_dst + channels, out_row);
        ss[row] = static_cast<scalar_t>(size_of(dst));
        continue;
      }
      const scalar_t* m_dst = ms + (b * tokens + dst) * dim_m;
      const scalar_t* m_src = ms + (b * tokens + src) * dim_m;
      acc_t dot = 0, sq_dst = 0, sq_src = 0;
      for (int64_t k = 0; k < dim_m; ++k) {
        const acc_t a = m_dst[k], c = m_src[k];
        dot += a * c;
        sq_dst += a * a;
        sq_src += c * c;
      }
      const acc_t cos = dot / std::max(std::sqrt(sq_dst) * std::sqrt(sq_src), acc_t(kCosineEps));
      // the destination absorbs the share w = (1 + max(cos, 0)) / 2 of the source (at least half:
      // no token is dropped), and only that share's size (a NaN similarity counts as
      // dissimilar: written so that NaN gives w = 1/2)
      const acc_t absorbed = (acc_t(1) + (cos > acc_t(0) ? cos : acc_t(0))) * acc_t(0.5) * size_of(src);
      const acc_t new_size = size_of(dst) + absorbed;
      const acc_t alpha = absorbed / new_size;
      const scalar_t* x_src = xs + (b * tokens + src) * channels;
      for (int64_t c = 0; c < channels; ++c) {
        out_row[c] = static_cast<scalar_t>((1 - alpha) * acc_t(x_dst[c]) + alpha * acc_t(x_src[c]));
      }
      ss[row] = static_cast<scalar_t>(new_size);
    }
  });
}

std::tuple<at::Tensor&, at::Tensor&> atme_merge_out_cpu(
    const at::Tensor& x, const at::Tensor& metric, int64_t grid_h, int64_t grid_w,
    c10::string_view axis, int64_t num_prefix_tokens, const std::optional<at::Tensor>& size,
    at::Tensor& out, at::Tensor& size_out) {
  const AtmeLayout g = atme_layout("atme_merge", x, grid_h, grid_w, axis, num_prefix_tokens, false);
  check_atme_merge_inputs(x, metric, size);
  check_merge_outputs("atme_merge", x, g.out_tokens(), out, &size_out);
  TORCH_CHECK(x.device().is_cpu(), "atme_merge (cpu): x must be a CPU tensor");
  const at::Tensor xc = x.contiguous(), mc = metric.contiguous();
  const at::Tensor sc = size.has_value() ? size->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "atme_merge_cpu", [&] {
    atme_merge_cpu_kernel<scalar_t>(xc, mc, size.has_value() ? sc.data_ptr<scalar_t>() : nullptr,
                                    g, out, size_out);
  });
  return {out, size_out};
}


// Source token (in the merged layout) of every token of the restored grid.
at::Tensor atme_unmerge_index(const AtmeLayout& g) {
  at::Tensor index = at::empty({g.in_tokens()}, at::kLong);
  int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t t = 0; t < g.prefix; ++t) idx[t] = t;
  for (int64_t i = 0; i < g.rows; ++i) {
    for (int64_t j = 0; j < g.cols; ++j) {
      idx[g.prefix + i * g.cols + j] =
          g.prefix + (g.axis_w ? i * g.out_cols + j / 2 : (i / 2) * g.out_cols + j);
    }
  }
  return index;
}

at::Tensor& atme_unmerge_out_cpu(const at::Tensor& x, int64_t grid_h, int64_t grid_w,
                                 c10::string_view axis, int64_t num_prefix_tokens,
                                 at::Tensor& out) {
  const AtmeLayout g = atme_layout("atme_unmerge", x, grid_h, grid_w, axis, num_prefix_tokens, true);
  check_merge_outputs("atme_unmerge", x, g.in_tokens(), out, nullptr);
  TORCH_CHECK(x.device().is_cpu(), "atme_unmerge (cpu): x must be a CPU tensor");
  return at::index_select_out(out, x, 1, atme_unmerge_index(g));
}


}  // namespace

TORCH_LIBRARY_FRAGMENT(dcvit, m) {
  define_with_out(
      m,
      "tome_merge(Tensor x, Tensor metric, int r, Tensor? size, bool class_token, "
      "bool distill_token) -> (Tensor, Tensor)",
      {"out", "size_out"});
  define_with_out(
      m,
      "atme_merge(Tensor x, Tensor metric, int grid_h, int grid_w, str axis, "
      "int num_prefix_tokens, Tensor? size) -> (Tensor, Tensor)",
      {"out", "size_out"});
  define_with_out(m, "atme_unmerge(Tensor x, int grid_h, int grid_w, str axis, int num_prefix_tokens) -> Tensor");
}

TORCH_LIBRARY_IMPL(dcvit, CPU, m) {
  impl_with_out<&tome_merge_outputs, &tome_merge_out_cpu>(m, "tome_merge");
  impl_with_out<&atme_merge_outputs, &atme_merge_out_cpu>(m, "atme_merge");
  impl_with_out<&atme_unmerge_outputs, &atme_unmerge_out_cpu>(m, "atme_unmerge");
}

}  // namespace dcvit
