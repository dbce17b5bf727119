// Schema and CPU implementation of dcvit::mlp_block (see mlp_block.h).
#include "mlp_block.h"

#include "cpu_layer_norm.h"
#include "cpu_linear.h"
#include "functional_from_out.h"
#include "op_schema.h"

#include <torch/library.h>

namespace dcvit {

Activation parse_activation(c10::string_view act) {
  if (act == "gelu") return Activation::kGelu;
  if (act == "gelu_tanh") return Activation::kGeluTanh;
  if (act == "quick_gelu") return Activation::kQuickGelu;
  if (act == "silu") return Activation::kSilu;
  TORCH_CHECK(false, "mlp_block: act must be one of gelu, gelu_tanh, quick_gelu, silu; got '",
              std::string(act), "'");
}

void check_mlp_block_args(const at::Tensor& x, const at::Tensor& norm_weight,
                          const at::Tensor& norm_bias, const at::Tensor& fc1_weight,
                          const at::Tensor& fc1_bias, const at::Tensor& fc2_weight,
                          const at::Tensor& fc2_bias, const std::optional<at::Tensor>& gamma,
                          bool gated, const std::optional<at::Tensor>& inner_norm_weight,
                          const std::optional<at::Tensor>& inner_norm_bias, const at::Tensor& out) {
  TORCH_CHECK(x.dim() >= 2, "mlp_block: x must be (..., D), got ", x.sizes());
  const int64_t dim = x.size(-1);
  TORCH_CHECK(fc1_weight.dim() == 2 && fc1_weight.size(1) == dim,
              "mlp_block: fc1_weight must be (H, D=", dim, "), got ", fc1_weight.sizes());
  const int64_t width = fc1_weight.size(0);
  TORCH_CHECK(width >= 1, "mlp_block: hidden width must be >= 1");
  TORCH_CHECK(!gated || width % 2 == 0, "mlp_block: gated fc1_weight must be (2H, D), got an odd ",
              width, " rows");
  const int64_t hidden = gated ? width / 2 : width;
  TORCH_CHECK(fc2_weight.dim() == 2 && fc2_weight.size(0) == dim && fc2_weight.size(1) == hidden,
              "mlp_block: fc2_weight must be (D=", dim, ", H=", hidden, "), got ",
              fc2_weight.sizes());
  auto check_vec = [&](const at::Tensor& t, int64_t n, const char* name) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "mlp_block: ", name, " must be (", n, "), got ",
                t.sizes());
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "mlp_block: ", name, " has dtype ",
                t.scalar_type(), " but x has ", x.scalar_type());
    TORCH_CHECK(t.device() == x.device(), "mlp_block: ", name, " is on ", t.device(),
                " but x is on ", x.device());
  };
  check_vec(norm_weight, dim, "norm_weight");
  check_vec(norm_bias, dim, "norm_bias");
  check_vec(fc1_bias, width, "fc1_bias");
  check_vec(fc2_bias, dim, "fc2_bias");
  if (gamma.has_value()) check_vec(*gamma, dim, "gamma");
  TORCH_CHECK(inner_norm_weight.has_value() == inner_norm_bias.has_value(),
              "mlp_block: give inner_norm_weight and inner_norm_bias together, or neither");
  if (inner_norm_weight.has_value()) {
    check_vec(*inner_norm_weight, hidden, "inner_norm_weight");
    check_vec(*inner_norm_bias, hidden, "inner_norm_bias");
  }
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{fc1_weight, "fc1_weight"},
                                {fc2_weight, "fc2_weight"}}) {
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "mlp_block: ", name, " has dtype ",
                t.scalar_type(), " but x has ", x.scalar_type());
    TORCH_CHECK(t.device() == x.device(), "mlp_block: ", name, " is on ", t.device(),
                " but x is on ", x.device());
  }
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() &&
                  out.device() == x.device() && out.is_contiguous(),
              "mlp_block: out must be a contiguous tensor shaped and typed like x");
}

at::Tensor mlp_block_outputs(const at::Tensor& x, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, double, const std::optional<at::Tensor>&,
                             c10::string_view, bool, const std::optional<at::Tensor>&,
                             const std::optional<at::Tensor>&) {
  return at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
}

namespace {

// Rows are processed in chunks so the hidden activations of one chunk stay in cache
// instead of materializing (B*N, H) at once (ATen's addmm path). The fused oneDNN linears
// (cpu_linear.h) pay a per-call cost (weight reorder, thread sync): at 2 threads, DeiT-S
// shapes ran fastest with all 12608 rows of batch 64 in one call and up to ~2x slower in
// chunks of 512, so they take chunks of 8192 rows, which only bounds the hidden's memory.
constexpr int64_t kRowChunk = 256;
constexpr int64_t kFusedRowChunk = 8192;

// The activation in place, with ATen's kernels (as the torch reference computes it).
void activate_(at::Tensor& h, Activation act) {
  switch (act) {
    case Activation::kGelu: at::gelu_(h); break;
    case Activation::kGeluTanh: at::gelu_(h, "tanh"); break;
    case Activation::kQuickGelu: h.mul_(at::sigmoid(h * 1.702)); break;
    case Activation::kSilu: at::silu_(h); break;
  }
}

// oneDNN's epilogue for `act`; QuickGELU has none (cpu_linear.h) and runs as activate_.
LinearEpilogue fused_epilogue(Activation act) {
  switch (act) {
    case Activation::kGelu: return LinearEpilogue::kGelu;
    case Activation::kGeluTanh: return LinearEpilogue::kGeluTanh;
    case Activation::kSilu: return LinearEpilogue::kSilu;
    case Activation::kQuickGelu: break;
  }
  return LinearEpilogue::kNone;
}

// act(normed @ w^T + b) through oneDNN, the activation in its epilogue (QuickGELU after it).
at::Tensor fused_linear_act(const at::Tensor& normed, const at::Tensor& w, const at::Tensor& b,
                            Activation act) {
  at::Tensor h = cpu_linear(normed, w, b, fused_epilogue(act));
  if (act == Activation::kQuickGelu) activate_(h, act);
  return h;
}

// The (rows, H) input of fc2 from one chunk of normalized rows, through oneDNN. Gated: two
// GEMMs over fc1's halves (contiguous row slices, no copy), the first with the activation
// in its epilogue, the second with the gate product as its binary epilogue, so the hidden
// is written once as (rows, H) and no elementwise pass runs (QuickGELU's aside); the two
// GEMMs' FLOPs are the one (2H)-wide GEMM's.
at::Tensor fused_hidden(const at::Tensor& normed, const at::Tensor& fc1_weight,
                        const at::Tensor& fc1_bias, Activation act, bool gated) {
  if (!gated) return fused_linear_act(normed, fc1_weight, fc1_bias, act);
  const int64_t hidden = fc1_weight.size(0) / 2;
  const at::Tensor gate = fused_linear_act(normed, fc1_weight.narrow(0, 0, hidden),
                                           fc1_bias.narrow(0, 0, hidden), act);
  return cpu_linear_mul(normed, fc1_weight.narrow(0, hidden, hidden),
                        fc1_bias.narrow(0, hidden, hidden), gate);
}

// The same with ATen's addmm (dtypes oneDNN does not take here): one GEMM for both halves.
at::Tensor aten_hidden(const at::Tensor& normed, const at::Tensor& fc1_t, const at::Tensor& fc1_bias,
                       Activation act, bool gated) {
  at::Tensor h = at::addmm(fc1_bias, normed, fc1_t);
  if (!gated) {
    activate_(h, act);
    return h;
  }
  const int64_t hidden = h.size(1) / 2;
  at::Tensor gate = h.narrow(1, 0, hidden);
  activate_(gate, act);
  return gate.mul(h.narrow(1, hidden, hidden));
}

at::Tensor& mlp_block_out_cpu(const at::Tensor& x, const at::Tensor& norm_weight,
                              const at::Tensor& norm_bias, const at::Tensor& fc1_weight,
                              const at::Tensor& fc1_bias, const at::Tensor& fc2_weight,
                              const at::Tensor& fc2_bias, double eps,
                              const std::optional<at::Tensor>& gamma, c10::string_view act_name,
                              bool gated, const std::optional<at::Tensor>& inner_norm_weight,
                              const std::optional<at::Tensor>& inner_norm_bias, at::Tensor& out) {
  check_mlp_block_args(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                       gamma, gated, inner_norm_weight, inner_norm_bias, out);
  const Activation act = parse_activation(act_name);
  TORCH_CHECK(x.device().is_cpu(), "mlp_block (cpu): x must be a CPU tensor");
  const int64_t dim = x.size(-1);
  const at::Tensor rows_in = x.reshape({-1, dim}).contiguous();
  at::Tensor rows_out = out.view({-1, dim});
  const bool fused = cpu_fused_linear_ok(x.scalar_type());
  const at::Tensor fc1_t = fc1_weight.t();
  const at::Tensor fc2_t = fc2_weight.t();
  const int64_t rows = rows_in.size(0);
  const int64_t step = fused ? kFusedRowChunk : kRowChunk;
  for (int64_t start = 0; start < rows; start += step) {
    const int64_t len = std::min(step, rows - start);
    const at::Tensor chunk = rows_in.narrow(0, start, len);
    at::Tensor dest = rows_out.narrow(0, start, len);
    const at::Tensor normed = cpu_layer_norm(chunk, norm_weight, norm_bias, eps);
    at::Tensor hidden = fused ? fused_hidden(normed, fc1_weight, fc1_bias, act, gated)
                              : aten_hidden(normed, fc1_t, fc1_bias, act, gated);
    if (inner_norm_weight.has_value()) {
      // a row statistic over all H channels: a pass of its own (ATen's vectorized kernel)
      hidden = at::layer_norm(hidden, {hidden.size(1)}, *inner_norm_weight, *inner_norm_bias, eps);
    }
    if (fused) {
      // bias + residual in fc2's epilogue (LayerScale between them leaves fc2 with its bias only)
      if (gamma.has_value()) {
        at::Tensor branch = cpu_linear(hidden, fc2_weight, fc2_bias, LinearEpilogue::kNone);
        at::add_out(dest, chunk, branch.mul_(*gamma));
      } else {
        dest.copy_(cpu_linear_add(hidden, fc2_weight, fc2_bias, chunk));
      }
      continue;
    }
    at::Tensor branch = at::addmm(fc2_bias, hidden, fc2_t);
    if (gamma.has_value()) branch.mul_(*gamma);
    at::add_out(dest, chunk, branch);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dcvit, m) {
  define_with_out(
      m,
      "mlp_block(Tensor x, Tensor norm_weight, Tensor norm_bias, Tensor fc1_weight, "
      "Tensor fc1_bias, Tensor fc2_weight, Tensor fc2_bias, float eps, Tensor? gamma, "
      "str act=\"gelu\", bool gated=False, Tensor? inner_norm_weight=None, "
      "Tensor? inner_norm_bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(dcvit, CPU, m) {
  impl_with_out<&mlp_block_outputs, &mlp_block_out_cpu>(m, "mlp_block");
}

}  // namespace dcvit
