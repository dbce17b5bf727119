// Schema and CPU implementation of dcvit::attention_block (see attention.h), and the
// device-independent attention core shared with the CUDA impl.
#include "attention.h"

#include "cpu_attention.h"
#include "cpu_layer_norm.h"
#include "cpu_linear.h"
#include "functional_from_out.h"
#include "op_schema.h"

#include <torch/library.h>

#include <algorithm>
#include <map>
#include <numeric>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace dcvit {

void check_attention_block_args(const at::Tensor& x, const at::Tensor& norm_weight,
                                const at::Tensor& norm_bias, const at::Tensor& qkv_weight,
                                const std::optional<at::Tensor>& qkv_bias,
                                const at::Tensor& proj_weight,
                                const std::optional<at::Tensor>& proj_bias,
                                at::IntArrayRef qk_dims, at::IntArrayRef v_dims,
                                const std::optional<at::Tensor>& gamma,
                                const std::optional<at::Tensor>& key_bias,
                                const EvaParts& eva, const at::Tensor& out) {
  TORCH_CHECK(x.dim() == 3, "attention_block: x must be (B, N, D), got ", x.sizes());
  const int64_t batch = x.size(0), tokens = x.size(1), dim = x.size(2);
  TORCH_CHECK(!qk_dims.empty() && qk_dims.size() == v_dims.size(),
              "attention_block: qk_dims and v_dims must list the same number (>= 1) of heads, got ",
              qk_dims.size(), " and ", v_dims.size());
  for (size_t h = 0; h < qk_dims.size(); ++h) {
    TORCH_CHECK(qk_dims[h] >= 1 && v_dims[h] >= 1, "attention_block: head ", h,
                " has qk width ", qk_dims[h], " and v width ", v_dims[h], "; widths must be >= 1");
  }
  const int64_t qk_total = std::accumulate(qk_dims.begin(), qk_dims.end(), int64_t{0});
  const int64_t v_total = std::accumulate(v_dims.begin(), v_dims.end(), int64_t{0});
  const int64_t qkv_rows = 2 * qk_total + v_total;
  TORCH_CHECK(qkv_weight.dim() == 2 && qkv_weight.size(0) == qkv_rows && qkv_weight.size(1) == dim,
              "attention_block: qkv_weight must be (2*sum(qk_dims)+sum(v_dims)=", qkv_rows, ", D=",
              dim, "), got ", qkv_weight.sizes());
  TORCH_CHECK(proj_weight.dim() == 2 && proj_weight.size(0) == dim && proj_weight.size(1) == v_total,
              "attention_block: proj_weight must be (D=", dim, ", sum(v_dims)=", v_total, "), got ",
              proj_weight.sizes());
  auto check_like_x = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "attention_block: ", name, " has dtype ",
                t.scalar_type(), " but x has ", x.scalar_type());
    TORCH_CHECK(t.device() == x.device(), "attention_block: ", name, " is on ", t.device(),
                " but x is on ", x.device());
  };
  auto check_vec = [&](const at::Tensor& t, int64_t n, const char* name) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "attention_block: ", name, " must be (", n,
                "), got ", t.sizes());
    check_like_x(t, name);
  };
  check_vec(norm_weight, dim, "norm_weight");
  check_vec(norm_bias, dim, "norm_bias");
  if (qkv_bias.has_value()) check_vec(*qkv_bias, qkv_rows, "qkv_bias");
  if (proj_bias.has_value()) check_vec(*proj_bias, dim, "proj_bias");
  if (gamma.has_value()) check_vec(*gamma, dim, "gamma");
  check_like_x(qkv_weight, "qkv_weight");
  check_like_x(proj_weight, "proj_weight");
  if (key_bias.has_value()) {
    TORCH_CHECK(key_bias->dim() == 2 && key_bias->size(0) == batch && key_bias->size(1) == tokens,
                "attention_block: key_bias must be (B=", batch, ", N=", tokens, "), got ",
                key_bias->sizes());
    check_like_x(*key_bias, "key_bias");
  }
  TORCH_CHECK(eva.q_norm_weight.has_value() == eva.q_norm_bias.has_value() &&
                  eva.q_norm_weight.has_value() == eva.k_norm_weight.has_value() &&
                  eva.k_norm_weight.has_value() == eva.k_norm_bias.has_value(),
              "attention_block: pass all of q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias "
              "or none");
  if (eva.q_norm_weight.has_value()) {
    for (int64_t d : qk_dims) {
      TORCH_CHECK(d == qk_dims[0], "attention_block: q/k-norm needs heads of one q/k width, got ",
                  qk_dims);
    }
    check_vec(*eva.q_norm_weight, qk_dims[0], "q_norm_weight");
    check_vec(*eva.q_norm_bias, qk_dims[0], "q_norm_bias");
    check_vec(*eva.k_norm_weight, qk_dims[0], "k_norm_weight");
    check_vec(*eva.k_norm_bias, qk_dims[0], "k_norm_bias");
  }
  TORCH_CHECK(eva.inner_norm_weight.has_value() == eva.inner_norm_bias.has_value(),
              "attention_block: pass both inner_norm_weight and inner_norm_bias or neither");
  if (eva.inner_norm_weight.has_value()) {
    check_vec(*eva.inner_norm_weight, v_total, "inner_norm_weight");
    check_vec(*eva.inner_norm_bias, v_total, "inner_norm_bias");
  }
  TORCH_CHECK(eva.rope_cos.has_value() == eva.rope_sin.has_value(),
              "attention_block: pass both rope_cos and rope_sin or neither");
  TORCH_CHECK(!eva.rope_index.has_value() || eva.rope_cos.has_value(),
              "attention_block: rope_index without rope_cos/rope_sin");
  if (eva.rope_cos.has_value()) {
    for (int64_t d : qk_dims) {
      TORCH_CHECK(d % 2 == 0, "attention_block: RoPE needs even q/k widths, got ", qk_dims);
    }
    for (const auto* table : {&*eva.rope_cos, &*eva.rope_sin}) {
      TORCH_CHECK(table->dim() == 2 && table->size(1) == qk_total && table->is_floating_point() &&
                      table->device() == x.device(),
                  "attention_block: rope_cos and rope_sin must be float tables (positions, "
                  "sum(qk_dims)=", qk_total, ") on x's device, got ", table->sizes());
    }
    TORCH_CHECK(eva.rope_cos->sizes() == eva.rope_sin->sizes(),
                "attention_block: rope_cos and rope_sin must have one shape");
    if (eva.rope_index.has_value()) {
      const at::Tensor& index = *eva.rope_index;
      TORCH_CHECK(index.dim() == 2 && index.size(0) == batch && index.size(1) == tokens &&
                      (index.scalar_type() == at::kInt || index.scalar_type() == at::kLong) &&
                      index.device() == x.device(),
                  "attention_block: rope_index must be an int (B=", batch, ", N=", tokens,
                  ") tensor on x's device, got ", index.sizes(), " ", index.scalar_type());
    } else {
      TORCH_CHECK(eva.rope_cos->size(0) == tokens, "attention_block: without rope_index the RoPE "
                  "tables need N=", tokens, " rows, got ", eva.rope_cos->size(0));
    }
  }
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() &&
                  out.device() == x.device() && out.is_contiguous(),
              "attention_block: out must be a contiguous tensor shaped and typed like x");
}

namespace {

// Heads run together by one SDPA call: their q/k and v widths are padded with zero columns
// to `qk_width` / `v_width` (exact: a zero q/k column adds nothing to q k^T, a zero v column
// gives a context column that is dropped).
struct HeadGroup {
  int64_t qk_width = 0, v_width = 0;
  std::vector<int64_t> heads;
};

int64_t round_up(int64_t value, int64_t step) { return (value + step - 1) / step * step; }

// Heads grouped by their q/k width rounded up to kWidthStep, each group as wide as its widest
// member: a DeiT-B block pruned per head (UVC) runs as at most 4 batched calls instead of one
// small call per head, for at most kWidthStep - 1 zero columns per head.
constexpr int64_t kWidthStep = 16;

std::vector<HeadGroup> group_heads(at::IntArrayRef qk_dims, at::IntArrayRef v_dims) {
  std::map<int64_t, HeadGroup> by_width;
  for (size_t h = 0; h < qk_dims.size(); ++h) {
    HeadGroup& group = by_width[round_up(qk_dims[h], kWidthStep)];
    group.qk_width = std::max(group.qk_width, qk_dims[h]);
    group.v_width = std::max(group.v_width, v_dims[h]);
    group.heads.push_back(static_cast<int64_t>(h));
  }
  std::vector<HeadGroup> groups;
  for (auto& [key, group] : by_width) groups.push_back(std::move(group));
  return groups;
}

// The group's heads of one of q/k/v (B, N, C), as (B, heads, N, width): a view when the
// heads are adjacent and all exactly `width` wide, else one stacked copy (heads narrower
// than `width` zero-padded first; build_engine's padded heads need no padding for q/k).
at::Tensor gather_heads(const at::Tensor& part, const std::vector<int64_t>& heads,
                        const std::vector<int64_t>& offsets, at::IntArrayRef widths,
                        int64_t width) {
  const int64_t count = static_cast<int64_t>(heads.size());
  bool view = heads.back() - heads.front() + 1 == count;
  for (int64_t h : heads) view = view && widths[h] == width;
  if (view) {
    return part.narrow(2, offsets[heads.front()], count * width)
        .unflatten(2, {count, width})
        .transpose(1, 2);
  }
  std::vector<at::Tensor> slices;
  slices.reserve(heads.size());
  for (int64_t h : heads) {
    const at::Tensor slice = part.narrow(2, offsets[h], widths[h]);
    slices.push_back(widths[h] == width ? slice
                                        : at::constant_pad_nd(slice, {0, width - widths[h]}, 0));
  }
  return at::stack(slices, 1);
}

// Writes each head's first v_dims[h] columns of heads_out (B, heads, N, width) into its
// columns of ctx (B, N, sum(v_dims)).
void scatter_heads(const at::Tensor& heads_out, const std::vector<int64_t>& heads,
                   const std::vector<int64_t>& offsets, at::IntArrayRef v_dims, int64_t width,
                   at::Tensor& ctx) {
  const int64_t count = static_cast<int64_t>(heads.size());
  bool view = heads.back() - heads.front() + 1 == count;
  for (int64_t h : heads) view = view && v_dims[h] == width;
  if (view) {
    ctx.narrow(2, offsets[heads.front()], count * width)
        .unflatten(2, {count, width})
        .copy_(heads_out.transpose(1, 2));
    return;
  }
  for (int64_t i = 0; i < count; ++i) {
    const int64_t h = heads[i];
    ctx.narrow(2, offsets[h], v_dims[h]).copy_(heads_out.select(1, i).narrow(2, 0, v_dims[h]));
  }
}

}  // namespace

at::Tensor attention_context(const at::Tensor& qkv, at::IntArrayRef qk_dims,
                             at::IntArrayRef v_dims, double scale,
                             const std::optional<at::Tensor>& key_bias) {
  const int64_t heads = static_cast<int64_t>(qk_dims.size());
  const int64_t batch = qkv.size(0), tokens = qkv.size(1);
  std::vector<int64_t> qk_offsets(heads), v_offsets(heads);
  int64_t qk_total = 0, v_total = 0;
  for (int64_t h = 0; h < heads; ++h) {
    qk_offsets[h] = qk_total;
    v_offsets[h] = v_total;
    qk_total += qk_dims[h];
    v_total += v_dims[h];
  }
  const at::Tensor q = qkv.narrow(2, 0, qk_total);
  const at::Tensor k = qkv.narrow(2, qk_total, qk_total);
  const at::Tensor v = qkv.narrow(2, 2 * qk_total, v_total);
  // (B, 1, 1, N): one additive bias per key, broadcast over heads and queries.
  std::optional<at::Tensor> mask;
  if (key_bias.has_value()) mask = key_bias->reshape({batch, 1, 1, tokens});

  const std::vector<HeadGroup> groups = group_heads(qk_dims, v_dims);
  at::Tensor ctx;
  for (const HeadGroup& group : groups) {
    const at::Tensor gq = gather_heads(q, group.heads, qk_offsets, qk_dims, group.qk_width);
    const at::Tensor gk = gather_heads(k, group.heads, qk_offsets, qk_dims, group.qk_width);
    const at::Tensor gv = gather_heads(v, group.heads, v_offsets, v_dims, group.v_width);
    // bf16 on a CPU with AVX512-BF16 and no AMX: this project's kernel (cpu_attention.h: ATen's
    // flash kernel runs at a third of its speed there); else, and on CUDA, SDPA
    std::optional<at::Tensor> fast;
    if (qkv.device().is_cpu()) fast = cpu_attention_bf16(gq, gk, gv, mask, scale);
    const at::Tensor out = fast ? *fast
                                : at::scaled_dot_product_attention(gq, gk, gv, mask,
                                                                   /*dropout_p=*/0.0,
                                                                   /*is_causal=*/false, scale);
    // (B, heads in group, N, v_width); when one group holds every head at its own width and
    // the kernel wrote it token-major (ATen's CPU flash kernel does), it is the context as is
    const at::Tensor token_major = out.transpose(1, 2);
    if (groups.size() == 1 && static_cast<int64_t>(group.heads.size()) * group.v_width == v_total &&
        token_major.is_contiguous())
      return token_major.view({batch, tokens, v_total});
    if (!ctx.defined()) ctx = at::empty({batch, tokens, v_total}, qkv.options());
    scatter_heads(out, group.heads, v_offsets, v_dims, group.v_width, ctx);
  }
  return ctx;
}

namespace {

// t (B, N, H, d): LayerNorm over d (when `weight` is given), then RoPE with cos, sin
// (B or 1, N, H, d) when given: t * cos + rotate_half(t) * sin in the tables' precision
// (at least float32), rounded once to t's dtype.
at::Tensor norm_rotate(at::Tensor t, const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& bias, double eps, const at::Tensor& cos,
                       const at::Tensor& sin) {
  const int64_t width = t.size(-1);
  if (weight.has_value()) t = at::layer_norm(t, {width}, *weight, *bias, eps);
  if (!cos.defined()) return t;
  const at::Tensor wide = t.to(cos.scalar_type());
  const int64_t half = width / 2;
  const at::Tensor rotated =
      at::cat({wide.narrow(-1, half, width - half).neg(), wide.narrow(-1, 0, half)}, -1);
  return (wide * cos + rotated * sin).to(t.scalar_type());
}

}  // namespace

at::Tensor apply_qk_norm_rope(const at::Tensor& qkv, at::IntArrayRef qk_dims, double eps,
                              const EvaParts& eva) {
  if (!eva.q_norm_weight.has_value() && !eva.rope_cos.has_value()) return qkv;
  const int64_t batch = qkv.size(0), tokens = qkv.size(1);
  const int64_t heads = static_cast<int64_t>(qk_dims.size());
  const int64_t qk_total = std::accumulate(qk_dims.begin(), qk_dims.end(), int64_t{0});
  // the rows each token uses, (B or 1, N, qk_total), in float32 (float64 for float64 inputs)
  at::Tensor cos, sin;
  // the CPU rotates in one pass of its own (cpu_rope_), after the norms below
  const bool rope_here = eva.rope_cos.has_value() && !qkv.device().is_cpu();
  if (rope_here) {
    const auto wide = qkv.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    auto rows = [&](const at::Tensor& table) {
      const at::Tensor t = table.to(wide);
      if (!eva.rope_index.has_value()) return t.narrow(0, 0, tokens).unsqueeze(0);
      return t.index_select(0, eva.rope_index->reshape({-1})).view({batch, tokens, qk_total});
    };
    cos = rows(*eva.rope_cos);
    sin = rows(*eva.rope_sin);
  }
  bool uniform = true;
  for (int64_t d : qk_dims) uniform = uniform && d == qk_dims[0];
  at::Tensor out = qkv.clone();
  const bool norms = eva.q_norm_weight.has_value();
  for (int64_t part = 0; part < 2 && (norms || rope_here); ++part) {
    const auto& weight = part == 0 ? eva.q_norm_weight : eva.k_norm_weight;
    const auto& bias = part == 0 ? eva.q_norm_bias : eva.k_norm_bias;
    // all heads at once when they share one width, else head by head
    const int64_t steps = uniform ? 1 : heads;
    int64_t offset = 0;
    for (int64_t step = 0; step < steps; ++step) {
      const int64_t width = qk_dims[step], count = uniform ? heads : 1;
      auto split = [&](const at::Tensor& t, int64_t first) {
        return t.narrow(2, first, count * width).unflatten(2, {count, width});
      };
      const at::Tensor head_cos = cos.defined() ? split(cos, offset) : at::Tensor();
      const at::Tensor head_sin = sin.defined() ? split(sin, offset) : at::Tensor();
      const int64_t column = part * qk_total + offset;
      split(out, column)
          .copy_(norm_rotate(split(qkv, column), weight, bias, eps, head_cos, head_sin));
      offset += count * width;
    }
  }
  if (eva.rope_cos.has_value() && !rope_here) {
    const auto wide = qkv.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    cpu_rope_(out, qk_dims, eva.rope_cos->to(wide).contiguous(), eva.rope_sin->to(wide).contiguous(),
              eva.rope_index);
  }
  return out;
}

at::Tensor apply_inner_norm(const at::Tensor& ctx, double eps, const EvaParts& eva) {
  if (!eva.inner_norm_weight.has_value()) return ctx;
  return at::layer_norm(ctx, {ctx.size(-1)}, *eva.inner_norm_weight, *eva.inner_norm_bias, eps);
}

namespace {

bool uniform_widths(at::IntArrayRef dims) {
  return std::all_of(dims.begin(), dims.end(), [&](int64_t d) { return d == dims[0]; });
}

}  // namespace

int64_t key_mean_width(at::IntArrayRef qk_dims) {
  return uniform_widths(qk_dims) ? qk_dims[0]
                                 : std::accumulate(qk_dims.begin(), qk_dims.end(), int64_t{0});
}

void check_key_mean_args(const at::Tensor& x, at::IntArrayRef qk_dims, const EvaParts& eva,
                         const at::Tensor& key_mean) {
  TORCH_CHECK(!eva.rope_cos.has_value(), "attention_block_key_mean: RoPE is refused (the merge "
              "metric is taken before RoPE, and merges and RoPE do not meet)");
  TORCH_CHECK(key_mean.dim() == 3 && key_mean.size(0) == x.size(0) && key_mean.size(1) == x.size(1) &&
                  key_mean.size(2) == key_mean_width(qk_dims) &&
                  key_mean.scalar_type() == x.scalar_type() && key_mean.device() == x.device() &&
                  key_mean.is_contiguous(),
              "attention_block_key_mean: key_mean_out must be a contiguous (B, N, ",
              key_mean_width(qk_dims), ") tensor typed like x");
}

void write_key_mean(const at::Tensor& qkv, at::IntArrayRef qk_dims, at::Tensor& key_mean) {
  const int64_t heads = static_cast<int64_t>(qk_dims.size());
  const int64_t qk_total = std::accumulate(qk_dims.begin(), qk_dims.end(), int64_t{0});
  const at::Tensor k = qkv.narrow(2, qk_total, qk_total);
  if (uniform_widths(qk_dims)) {
    at::mean_out(key_mean, k.unflatten(2, {heads, qk_dims[0]}), {2});
  } else {
    key_mean.copy_(k);  // heads of different widths cannot be averaged: side by side
  }
}

std::tuple<at::Tensor, at::Tensor> attention_block_key_mean_outputs(
    const at::Tensor& x, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const at::Tensor&, const std::optional<at::Tensor>&,
    at::IntArrayRef qk_dims, at::IntArrayRef, double, double, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&) {
  return {at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous)),
          at::empty({x.size(0), x.size(1), key_mean_width(qk_dims)}, x.options())};
}

at::Tensor attention_block_outputs(const at::Tensor& x, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const std::optional<at::Tensor>&,
                                   const at::Tensor&, const std::optional<at::Tensor>&,
                                   at::IntArrayRef, at::IntArrayRef, double, double,
                                   const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&) {
  return at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
}

namespace {

at::Tensor& attention_block_cpu(at::Tensor* key_mean, const at::Tensor& x, const at::Tensor& norm_weight,
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
  TORCH_CHECK(x.device().is_cpu(), "attention_block (cpu): x must be a CPU tensor");
  if (key_mean) check_key_mean_args(x, qk_dims, eva, *key_mean);
  const int64_t dim = x.size(2);
  const at::Tensor normed = cpu_layer_norm(x, norm_weight, norm_bias, eps);
  if (!cpu_fused_linear_ok(x.scalar_type())) {
    const at::Tensor qkv = apply_qk_norm_rope(at::linear(normed, qkv_weight, qkv_bias), qk_dims,
                                              eps, eva);
    if (key_mean) write_key_mean(qkv, qk_dims, *key_mean);
    const at::Tensor ctx =
        apply_inner_norm(attention_context(qkv, qk_dims, v_dims, scale, key_bias), eps, eva);
    at::Tensor branch = at::linear(ctx, proj_weight, proj_bias);
    if (gamma.has_value()) branch.mul_(*gamma);
    at::add_out(out, x, branch);
    return out;
  }
  // oneDNN linears (cpu_linear.h): qkv's bias and proj's bias + residual in the epilogues
  const int64_t batch = x.size(0), tokens = x.size(1);
  const at::Tensor qkv = apply_qk_norm_rope(
      cpu_linear(normed.view({batch * tokens, dim}), qkv_weight, qkv_bias, /*gelu=*/false)
          .view({batch, tokens, -1}),
      qk_dims, eps, eva);
  if (key_mean) write_key_mean(qkv, qk_dims, *key_mean);
  const at::Tensor ctx =
      apply_inner_norm(attention_context(qkv, qk_dims, v_dims, scale, key_bias), eps, eva)
          .reshape({batch * tokens, -1});
  at::Tensor rows_out = out.view({batch * tokens, dim});
  const at::Tensor rows_in = x.reshape({batch * tokens, dim});
  if (gamma.has_value()) {
    at::Tensor branch = cpu_linear(ctx, proj_weight, proj_bias, /*gelu=*/false);
    at::add_out(rows_out, rows_in, branch.mul_(*gamma));
  } else {
    rows_out.copy_(cpu_linear_add(ctx, proj_weight, proj_bias, rows_in));
  }
  return out;
}

at::Tensor& attention_block_out_cpu(
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
  return attention_block_cpu(nullptr, x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias,
                             qk_dims, v_dims, scale, eps, gamma, key_bias, q_norm_weight, q_norm_bias,
                             k_norm_weight, k_norm_bias, rope_cos, rope_sin, rope_index,
                             inner_norm_weight, inner_norm_bias, out);
}

// attention_block and, into key_mean_out, the merge metric (see attention.h)
std::tuple<at::Tensor&, at::Tensor&> attention_block_key_mean_out_cpu(
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
  attention_block_cpu(&key_mean_out, x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias,
                             qk_dims, v_dims, scale, eps, gamma, key_bias, q_norm_weight, q_norm_bias,
                             k_norm_weight, k_norm_bias, rope_cos, rope_sin, rope_index,
                             inner_norm_weight, inner_norm_bias, out);
  return {out, key_mean_out};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dcvit, m) {
  // one argument list, two ops: the block, and the block with the merge metric
  const std::string arguments =
      "(Tensor x, Tensor norm_weight, Tensor norm_bias, Tensor qkv_weight, "
      "Tensor? qkv_bias, Tensor proj_weight, Tensor? proj_bias, int[] qk_dims, int[] v_dims, "
      "float scale, float eps, Tensor? gamma, Tensor? key_bias, Tensor? q_norm_weight=None, "
      "Tensor? q_norm_bias=None, Tensor? k_norm_weight=None, Tensor? k_norm_bias=None, "
      "Tensor? rope_cos=None, Tensor? rope_sin=None, Tensor? rope_index=None, "
      "Tensor? inner_norm_weight=None, "
      "Tensor? inner_norm_bias=None)";
  define_with_out(m, "attention_block" + arguments + " -> Tensor");
  define_with_out(m, "attention_block_key_mean" + arguments + " -> (Tensor, Tensor)",
                  {"out", "key_mean_out"});
}

TORCH_LIBRARY_IMPL(dcvit, CPU, m) {
  impl_with_out<&attention_block_outputs, &attention_block_out_cpu>(m, "attention_block");
  impl_with_out<&attention_block_key_mean_outputs, &attention_block_key_mean_out_cpu>(
      m, "attention_block_key_mean");
}

}  // namespace dcvit
