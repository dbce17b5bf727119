// CUDA implementations of the token merging ops (see ../token_merge.h).
//
// ToMe: the best-match search is the score GEMM of the normalized metric (at::bmm) plus
// ATen's max/argsort (tome_merge_plan, shared with the CPU impl); the merge itself is our
// `weighted_gather_kernel`: one block per output token, reading x once per contributing
// token and writing the size-weighted average once. A gather instead of ToMe's scatter:
// no atomics, deterministic sums.
// ATME: `atme_merge_kernel`, one block per output token, computes the pair's cosine
// similarity (block reductions over the metric) and the blend in one pass.
// Unmerge: `atme_unmerge_kernel` copies each merged token to both grid positions.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../token_merge.h"
#include "block_reduce.cuh"

namespace dcvit {
namespace {

constexpr int kRowThreads = 128;
constexpr int kCopyThreads = 256;

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t load_size(const scalar_t* size, int64_t index) {
  return size != nullptr ? static_cast<acc_t>(size[index]) : acc_t(1);
}

// One block per output row (batch * n_out blocks). The plan's int64 indices are tokens of
// the batch element; every thread sums the (few) sizes itself to avoid a shared-memory trip.
template <typename scalar_t>
__global__ void weighted_gather_kernel(const scalar_t* __restrict__ x,
                                       const scalar_t* __restrict__ size,
                                       const int64_t* __restrict__ primary,
                                       const int64_t* __restrict__ begin,
                                       const int64_t* __restrict__ count,
                                       const int64_t* __restrict__ sources,
                                       scalar_t* __restrict__ out, scalar_t* __restrict__ size_out,
                                       int64_t tokens, int64_t n_out, int64_t channels, int64_t r) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = blockIdx.x;
  const int64_t b = row / n_out;
  const int64_t own = primary[row];
  const int64_t num = count[row];
  const int64_t* list = sources + b * r + begin[row];
  const scalar_t* xb = x + b * tokens * channels;
  const scalar_t* sb = size != nullptr ? size + b * tokens : nullptr;
  const acc_t own_size = load_size<acc_t>(sb, own);
  acc_t total = own_size;
  for (int64_t k = 0; k < num; ++k) total += load_size<acc_t>(sb, list[k]);
  scalar_t* dst = out + row * channels;
  const scalar_t* own_row = xb + own * channels;
  for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) {
    if (num == 0) {  // nothing merged in: copied bit-exactly
      dst[c] = own_row[c];
      continue;
    }
    acc_t acc = static_cast<acc_t>(own_row[c]) * own_size;
    for (int64_t k = 0; k < num; ++k) {
      acc += static_cast<acc_t>(xb[list[k] * channels + c]) * load_size<acc_t>(sb, list[k]);
    }
    dst[c] = static_cast<scalar_t>(acc / total);
  }
  if (threadIdx.x == 0) size_out[row] = static_cast<scalar_t>(total);
}

std::tuple<at::Tensor&, at::Tensor&> tome_merge_out_cuda(
    const at::Tensor& x, const at::Tensor& metric, int64_t r, const std::optional<at::Tensor>& size,
    bool class_token, bool distill_token, at::Tensor& out, at::Tensor& size_out) {
  const int64_t eff_r = check_tome_merge_inputs(x, metric, r, size, class_token, distill_token);
  check_merge_outputs("tome_merge", x, x.size(1) - eff_r, out, &size_out);
  TORCH_CHECK(x.is_cuda(), "tome_merge (cuda): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  if (eff_r == 0) {
    out.copy_(x);
    size.has_value() ? size_out.copy_(*size) : size_out.fill_(1);
    return {out, size_out};
  }
  const TomePlan plan = tome_merge_plan(metric, eff_r, class_token, distill_token);
  const at::Tensor xc = x.contiguous();
  const at::Tensor sc = size.has_value() ? size->contiguous() : at::Tensor();
  const int64_t rows = out.size(0) * out.size(1);
  if (rows == 0 || x.size(2) == 0) return {out, size_out};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tome_merge_cuda", [&] {
    weighted_gather_kernel<scalar_t><<<rows, kRowThreads, 0, stream>>>(
        xc.data_ptr<scalar_t>(), size.has_value() ? sc.data_ptr<scalar_t>() : nullptr,
        plan.primary.data_ptr<int64_t>(), plan.begin.data_ptr<int64_t>(),
        plan.count.data_ptr<int64_t>(), plan.sources.data_ptr<int64_t>(),
        out.data_ptr<scalar_t>(), size_out.data_ptr<scalar_t>(), x.size(1), out.size(1),
        x.size(2), eff_r);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, size_out};
}

std::tuple<at::Tensor, at::Tensor> tome_merge_cuda(const at::Tensor& x, const at::Tensor& metric,
                                                   int64_t r, const std::optional<at::Tensor>& size,
                                                   bool class_token, bool distill_token) {
  const int64_t eff_r = check_tome_merge_inputs(x, metric, r, size, class_token, distill_token);
  at::Tensor out = at::empty({x.size(0), x.size(1) - eff_r, x.size(2)}, x.options());
  at::Tensor size_out = at::empty({x.size(0), x.size(1) - eff_r, 1}, x.options());
  tome_merge_out_cuda(x, metric, r, size, class_token, distill_token, out, size_out);
  return {out, size_out};
}

// One block per output token (batch * n_out blocks), float math (float64 is refused). The
// pair test is uniform across the block, so every thread or none reaches block_sum's barriers.
template <typename scalar_t>
__global__ void atme_merge_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ metric,
                                  const scalar_t* __restrict__ size, scalar_t* __restrict__ out,
                                  scalar_t* __restrict__ size_out, int64_t tokens, int64_t n_out,
                                  int64_t channels, int64_t dim_m, AtmeLayout g) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
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
  const scalar_t* sb = size != nullptr ? size + b * tokens : nullptr;
  const scalar_t* x_dst = x + (b * tokens + dst) * channels;
  scalar_t* out_row = out + row * channels;
  if (src < 0) {  // prefix token or odd last column/row: passes through
    for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) out_row[c] = x_dst[c];
    if (threadIdx.x == 0) size_out[row] = static_cast<scalar_t>(load_size<float>(sb, dst));
    return;
  }
  const scalar_t* m_dst = metric + (b * tokens + dst) * dim_m;
  const scalar_t* m_src = metric + (b * tokens + src) * dim_m;
  float dot = 0.f, sq_dst = 0.f, sq_src = 0.f;
  for (int64_t k = threadIdx.x; k < dim_m; k += blockDim.x) {
    const float a = static_cast<float>(m_dst[k]), c = static_cast<float>(m_src[k]);
    dot += a * c;
    sq_dst += a * a;
    sq_src += c * c;
  }
  dot = block_sum(dot, scratch);
  sq_dst = block_sum(sq_dst, scratch);
  sq_src = block_sum(sq_src, scratch);
  const float cos = dot / fmaxf(sqrtf(sq_dst) * sqrtf(sq_src), static_cast<float>(kCosineEps));
  const float s_dst = load_size<float>(sb, dst), s_src = load_size<float>(sb, src);
  const acc_t alpha = fmaxf(cos, 0.f) * s_src / (s_dst + s_src);
  const scalar_t* x_src = x + (b * tokens + src) * channels;
  for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) {
    out_row[c] = static_cast<scalar_t>((1 - alpha) * static_cast<acc_t>(x_dst[c]) +
                                       alpha * static_cast<acc_t>(x_src[c]));
  }
  if (threadIdx.x == 0) size_out[row] = static_cast<scalar_t>(s_dst + s_src);
}

std::tuple<at::Tensor&, at::Tensor&> atme_merge_out_cuda(
    const at::Tensor& x, const at::Tensor& metric, int64_t grid_h, int64_t grid_w,
    c10::string_view axis, int64_t num_prefix_tokens, const std::optional<at::Tensor>& size,
    at::Tensor& out, at::Tensor& size_out) {
  const AtmeLayout g = atme_layout("atme_merge", x, grid_h, grid_w, axis, num_prefix_tokens, false);
  check_atme_merge_inputs(x, metric, size);
  check_merge_outputs("atme_merge", x, g.out_tokens(), out, &size_out);
  TORCH_CHECK(x.is_cuda(), "atme_merge (cuda): x must be a CUDA tensor");
  TORCH_CHECK(x.scalar_type() != at::kDouble,
              "atme_merge (cuda): float64 is not supported; use the torch backend");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), mc = metric.contiguous();
  const at::Tensor sc = size.has_value() ? size->contiguous() : at::Tensor();
  const int64_t rows = out.size(0) * out.size(1);
  if (rows == 0) return {out, size_out};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "atme_merge_cuda", [&] {
    atme_merge_kernel<scalar_t><<<rows, kRowThreads, 0, stream>>>(
        xc.data_ptr<scalar_t>(), mc.data_ptr<scalar_t>(),
        size.has_value() ? sc.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
        size_out.data_ptr<scalar_t>(), x.size(1), out.size(1), x.size(2), metric.size(2), g);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, size_out};
}

std::tuple<at::Tensor, at::Tensor> atme_merge_cuda(const at::Tensor& x, const at::Tensor& metric,
                                                   int64_t grid_h, int64_t grid_w,
                                                   c10::string_view axis, int64_t num_prefix_tokens,
                                                   const std::optional<at::Tensor>& size) {
  const AtmeLayout g = atme_layout("atme_merge", x, grid_h, grid_w, axis, num_prefix_tokens, false);
  at::Tensor out = at::empty({x.size(0), g.out_tokens(), x.size(2)}, x.options());
  at::Tensor size_out = at::empty({x.size(0), g.out_tokens(), 1}, x.options());
  atme_merge_out_cuda(x, metric, grid_h, grid_w, axis, num_prefix_tokens, size, out, size_out);
  return {out, size_out};
}

// Grid-stride over the restored (batch, tokens, channels) elements.
template <typename scalar_t>
__global__ void atme_unmerge_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                    int64_t numel, int64_t channels, int64_t n_in,
                                    int64_t n_full, AtmeLayout g) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < numel;
       e += stride) {
    const int64_t c = e % channels;
    const int64_t t = (e / channels) % n_full;
    const int64_t b = e / (channels * n_full);
    int64_t source = t;
    if (t >= g.prefix) {
      const int64_t i = (t - g.prefix) / g.cols, j = (t - g.prefix) % g.cols;
      source = g.prefix + (g.axis_w ? i * g.out_cols + j / 2 : (i / 2) * g.out_cols + j);
    }
    out[e] = x[(b * n_in + source) * channels + c];
  }
}

at::Tensor& atme_unmerge_out_cuda(const at::Tensor& x, int64_t grid_h, int64_t grid_w,
                                  c10::string_view axis, int64_t num_prefix_tokens,
                                  at::Tensor& out) {
  const AtmeLayout g = atme_layout("atme_unmerge", x, grid_h, grid_w, axis, num_prefix_tokens, true);
  check_merge_outputs("atme_unmerge", x, g.in_tokens(), out, nullptr);
  TORCH_CHECK(x.is_cuda(), "atme_unmerge (cuda): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const int64_t numel = out.numel();
  if (numel == 0) return out;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int blocks = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>((numel + kCopyThreads - 1) / kCopyThreads, sms * 32)));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "atme_unmerge_cuda", [&] {
    atme_unmerge_kernel<scalar_t><<<blocks, kCopyThreads, 0, stream>>>(
        xc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), numel, x.size(2), g.out_tokens(),
        g.in_tokens(), g);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor atme_unmerge_cuda(const at::Tensor& x, int64_t grid_h, int64_t grid_w,
                             c10::string_view axis, int64_t num_prefix_tokens) {
  const AtmeLayout g = atme_layout("atme_unmerge", x, grid_h, grid_w, axis, num_prefix_tokens, true);
  at::Tensor out = at::empty({x.size(0), g.in_tokens(), x.size(2)}, x.options());
  return atme_unmerge_out_cuda(x, grid_h, grid_w, axis, num_prefix_tokens, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(dcvit, CUDA, m) {
  m.impl("tome_merge", &tome_merge_cuda);
  m.impl("tome_merge.out", &tome_merge_out_cuda);
  m.impl("atme_merge", &atme_merge_cuda);
  m.impl("atme_merge.out", &atme_merge_out_cuda);
  m.impl("atme_unmerge", &atme_unmerge_cuda);
  m.impl("atme_unmerge.out", &atme_unmerge_out_cuda);
}

}  // namespace dcvit
