// ctest: dcvit::mlp_block's CPU kernel, reached through the dispatcher as any caller would,
// against a naive double-precision loop on odd shapes, with and without LayerScale, and a
// gated (SwiGLU) block with an inner norm.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <vector>

namespace {

using MlpBlockFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, double, const std::optional<at::Tensor>&,
                              c10::string_view, bool, const std::optional<at::Tensor>&,
                              const std::optional<at::Tensor>&);

double silu(double v) { return v / (1.0 + std::exp(-v)); }
double gelu(double v) { return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0))); }

// out[r, d] = x[r, d] + gamma[d] * (fc2 @ gelu(fc1 @ ln(x[r]) + b1) + b2)[d], in double;
// swiglu: silu(fc1's first half) * its second half, then the inner LayerNorm (inw, inb).
std::vector<double> naive_mlp_block(const at::Tensor& x, const at::Tensor& nw, const at::Tensor& nb,
                                    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                                    const at::Tensor& b2, const at::Tensor* gamma, double eps,
                                    bool swiglu, const at::Tensor& inw, const at::Tensor& inb) {
  const int64_t rows = x.numel() / x.size(-1), dim = x.size(-1), hidden = w2.size(1);
  auto X = x.reshape({rows, dim}).to(at::kDouble).contiguous();
  auto NW = nw.to(at::kDouble), NB = nb.to(at::kDouble), W1 = w1.to(at::kDouble),
       B1 = b1.to(at::kDouble), W2 = w2.to(at::kDouble), B2 = b2.to(at::kDouble);
  auto xa = X.accessor<double, 2>();
  auto nwa = NW.accessor<double, 1>(), nba = NB.accessor<double, 1>();
  auto w1a = W1.accessor<double, 2>();
  auto b1a = B1.accessor<double, 1>();
  auto w2a = W2.accessor<double, 2>();
  auto b2a = B2.accessor<double, 1>();
  std::vector<double> out(rows * dim), normed(dim), act(hidden);
  for (int64_t r = 0; r < rows; ++r) {
    double mean = 0, var = 0;
    for (int64_t d = 0; d < dim; ++d) mean += xa[r][d];
    mean /= dim;
    for (int64_t d = 0; d < dim; ++d) var += (xa[r][d] - mean) * (xa[r][d] - mean);
    var /= dim;
    for (int64_t d = 0; d < dim; ++d)
      normed[d] = (xa[r][d] - mean) / std::sqrt(var + eps) * nwa[d] + nba[d];
    for (int64_t h = 0; h < w1.size(0); ++h) {
      double acc = b1a[h];
      for (int64_t d = 0; d < dim; ++d) acc += w1a[h][d] * normed[d];
      if (!swiglu) act[h] = gelu(acc);
      else if (h < hidden) act[h] = silu(acc);
      else act[h - hidden] *= acc;
    }
    if (swiglu) {
      double hm = 0, hv = 0;
      for (int64_t h = 0; h < hidden; ++h) hm += act[h];
      hm /= hidden;
      for (int64_t h = 0; h < hidden; ++h) hv += (act[h] - hm) * (act[h] - hm);
      hv /= hidden;
      for (int64_t h = 0; h < hidden; ++h)
        act[h] = (act[h] - hm) / std::sqrt(hv + eps) * inw[h].item<double>() + inb[h].item<double>();
    }
    for (int64_t d = 0; d < dim; ++d) {
      double acc = b2a[d];
      for (int64_t h = 0; h < hidden; ++h) acc += w2a[d][h] * act[h];
      const double scale = gamma ? gamma->to(at::kDouble)[d].item<double>() : 1.0;
      out[r * dim + d] = xa[r][d] + scale * acc;
    }
  }
  return out;
}

bool check(int64_t batch, int64_t tokens, int64_t dim, int64_t hidden, bool layer_scale,
           bool swiglu = false) {
  at::manual_seed(batch * 1000 + tokens + dim + hidden);
  auto x = at::randn({batch, tokens, dim});
  auto nw = 1 + 0.2 * at::randn({dim}), nb = 0.1 * at::randn({dim});
  const int64_t width = swiglu ? 2 * hidden : hidden;
  auto w1 = at::randn({width, dim}) / std::sqrt(dim), b1 = 0.1 * at::randn({width});
  auto inw = (1 + 0.2 * at::randn({hidden})).to(at::kDouble), inb = (0.1 * at::randn({hidden})).to(at::kDouble);
  auto w2 = at::randn({dim, hidden}) / std::sqrt(hidden), b2 = 0.1 * at::randn({dim});
  std::optional<at::Tensor> gamma;
  if (layer_scale) gamma = at::rand({dim}) + 0.1;
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("dcvit::mlp_block", "").typed<MlpBlockFn>();
  std::optional<at::Tensor> inner_w, inner_b;
  if (swiglu) inner_w = inw.to(at::kFloat), inner_b = inb.to(at::kFloat);
  auto out = op.call(x, nw, nb, w1, b1, w2, b2, 1e-6, gamma, swiglu ? "silu" : "gelu", swiglu,
                     inner_w, inner_b)
                 .contiguous();
  auto expected = naive_mlp_block(x, nw, nb, w1, b1, w2, b2, gamma ? &*gamma : nullptr, 1e-6,
                                  swiglu, inw, inb);
  const float* got = out.data_ptr<float>();
  double err2 = 0, ref2 = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    err2 += (got[i] - expected[i]) * (got[i] - expected[i]);
    ref2 += expected[i] * expected[i];
  }
  const double rel = std::sqrt(err2 / ref2);
  const bool ok = std::isfinite(rel) && rel < 1e-5;
  std::printf("%s mlp_block B=%lld N=%lld D=%lld H=%lld layer_scale=%d swiglu=%d rel_err=%.3e\n",
              ok ? "PASS" : "FAIL", (long long)batch, (long long)tokens, (long long)dim,
              (long long)hidden, (int)layer_scale, (int)swiglu, rel);
  return ok;
}

}  // namespace

int main() {
  bool ok = true;
  ok &= check(2, 197, 96, 37, false);
  ok &= check(1, 50, 192, 1000, true);
  ok &= check(3, 7, 48, 1, true);
  ok &= check(2, 37, 48, 101, true, /*swiglu=*/true);
  return ok ? 0 : 1;
}
