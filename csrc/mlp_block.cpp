// Schema and CPU implementation of dcvit::mlp_block (see mlp_block.h).
#include "mlp_block.h"

#include "cpu_linear.h"
#include "functional_from_out.h"

#include <torch/library.h>

namespace dcvit {

void check_mlp_block_args(const at::Tensor& x, const at::Tensor& norm_weight,
                          const at::Tensor& norm_bias, const at::Tensor& fc1_weight,
                          const at::Tensor& fc1_bias, const at::Tensor& fc2_weight,
                          const at::Tensor& fc2_bias, const std::optional<at::Tensor>& gamma,
                          const at::Tensor& out) {
  TORCH_CHECK(x.dim() >= 2, "mlp_block: x must be (..., D), got ", x.sizes());
  const int64_t dim = x.size(-1);
  TORCH_CHECK(fc1_weight.dim() == 2 && fc1_weight.size(1) == dim,
              "mlp_block: fc1_weight must be (H, D=", dim, "), got ", fc1_weight.sizes());
  const int64_t hidden = fc1_weight.size(0);
  TORCH_CHECK(hidden >= 1, "mlp_block: hidden width must be >= 1");
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
  check_vec(fc1_bias, hidden, "fc1_bias");
  check_vec(fc2_bias, dim, "fc2_bias");
  if (gamma.has_value()) check_vec(*gamma, dim, "gamma");
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
                             const at::Tensor&, double, const std::optional<at::Tensor>&) {
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

at::Tensor& mlp_block_out_cpu(const at::Tensor& x, const at::Tensor& norm_weight,
                              const at::Tensor& norm_bias, const at::Tensor& fc1_weight,
                              const at::Tensor& fc1_bias, const at::Tensor& fc2_weight,
                              const at::Tensor& fc2_bias, double eps,
                              const std::optional<at::Tensor>& gamma, at::Tensor& out) {
  check_mlp_block_args(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                       gamma, out);
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
    const at::Tensor normed = at::layer_norm(chunk, {dim}, norm_weight, norm_bias, eps);
    if (fused) {
      // bias + exact GELU in fc1's epilogue; bias + residual in fc2's (LayerScale between
      // them leaves fc2 with its bias only)
      const at::Tensor hidden = cpu_linear(normed, fc1_weight, fc1_bias, /*gelu=*/true);
      if (gamma.has_value()) {
        at::Tensor branch = cpu_linear(hidden, fc2_weight, fc2_bias, /*gelu=*/false);
        at::add_out(dest, chunk, branch.mul_(*gamma));
      } else {
        dest.copy_(cpu_linear_add(hidden, fc2_weight, fc2_bias, chunk));
      }
      continue;
    }
    at::Tensor hidden = at::addmm(fc1_bias, normed, fc1_t);
    at::gelu_(hidden);  // exact (erf) GELU, as timm's nn.GELU
    at::Tensor branch = at::addmm(fc2_bias, hidden, fc2_t);
    if (gamma.has_value()) branch.mul_(*gamma);
    at::add_out(dest, chunk, branch);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dcvit, m) {
  m.def(
      "mlp_block(Tensor x, Tensor norm_weight, Tensor norm_bias, Tensor fc1_weight, "
      "Tensor fc1_bias, Tensor fc2_weight, Tensor fc2_bias, float eps, Tensor? gamma) -> Tensor");
  m.def(
      "mlp_block.out(Tensor x, Tensor norm_weight, Tensor norm_bias, Tensor fc1_weight, "
      "Tensor fc1_bias, Tensor fc2_weight, Tensor fc2_bias, float eps, Tensor? gamma, *, "
      "Tensor(a!) out) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(dcvit, CPU, m) {
  impl_with_out<&mlp_block_outputs, &mlp_block_out_cpu>(m, "mlp_block");
}

}  // namespace dcvit
