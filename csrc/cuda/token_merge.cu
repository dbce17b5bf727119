// CUDA implementations of the token merging ops (see ../token_merge.h).
//
// ToMe in four launches and no ATen op in between (the merge is launch-bound otherwise):
//   tome_match_kernel    each A token's best B match by cosine similarity: a tiled score GEMM
//                        with the norms folded in; scores never reach memory
//   tome_rank_kernel     each A token's place in ToMe's stable descending edge sort, by counting
//                        the tokens before it (a few hundred tokens: cheaper than a sort)
//   tome_plan_kernel     the gather plan, in ToMe's output order
//   weighted_gather_kernel  every output token the size-weighted average of its list, x read once,
//                        written once. A gather instead of ToMe's scatter: no atomics,
//                        deterministic sums.
// ATME: `atme_merge_kernel`, one block per output token, computes the pair's cosine
// similarity (block reductions over the metric) and the blend in one pass.
// Unmerge: `atme_unmerge_kernel` copies each merged token to both grid positions.
// Row accesses are 16-byte packs (8 x bf16) when a row's width allows it (kVec), else scalar;
// every kernel indexes (token, batch) from a 2-D grid: no per-element 64-bit division.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../functional_from_out.h"
#include "../token_merge.h"
#include "block_reduce.cuh"

namespace dcvit {
namespace {

constexpr int kRowThreads = 128;

// ---- 16-byte packs -------------------------------------------------------------------------

template <typename scalar_t>
constexpr int kPack = 16 / sizeof(scalar_t);

template <typename scalar_t>
struct alignas(16) Pack {
  scalar_t v[kPack<scalar_t>];
};

template <typename scalar_t>
__device__ __forceinline__ Pack<scalar_t> load_pack(const scalar_t* p) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  Pack<scalar_t> pack;
  memcpy(&pack, &raw, sizeof(raw));
  return pack;
}

template <typename scalar_t>
__device__ __forceinline__ void store_pack(scalar_t* p, const Pack<scalar_t>& pack) {
  uint4 raw;
  memcpy(&raw, &pack, sizeof(raw));
  *reinterpret_cast<uint4*>(p) = raw;
}

// Rows of `width` elements starting at `base` can be read as packs when every row start is
// 16-byte aligned.
template <typename scalar_t>
bool packs_fit(const void* base, int64_t width) {
  return width % kPack<scalar_t> == 0 && reinterpret_cast<std::uintptr_t>(base) % 16 == 0;
}

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t load_size(const scalar_t* size, int64_t index) {
  return size != nullptr ? static_cast<acc_t>(size[index]) : acc_t(1);
}

// Every kernel here runs a (tokens, batch) grid: gridDim.y caps the batch.
void check_grid_batch(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.size(0) <= 65535, op, " (cuda): batch ", x.size(0),
              " is over 65535; split the batch into chunks");
}

// Threads for one row of `width` elements read as `per_thread` each: a multiple of a warp.
int row_threads(int64_t width, int per_thread, int max_threads) {
  const int64_t needed = (width + per_thread - 1) / per_thread;
  return static_cast<int>(std::min<int64_t>(max_threads, std::max<int64_t>(32, (needed + 31) / 32 * 32)));
}

// ---- ToMe: match ---------------------------------------------------------------------------

// Scores are compared against each other to pick merges: at least fp32, fp64 for double.
template <typename scalar_t>
using score_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

constexpr int kMatchTile = 32;  // A rows and B rows per tile
constexpr int kMatchK = 32;     // metric channels per step
constexpr int kMatchThreads = 256;
constexpr int kMatchCols = kMatchTile / (kMatchThreads / kMatchTile);  // B columns per thread

// Block (A tile, batch): thread (row = tid / 8, lane8 = tid % 8) scores A token a0 + row
// against B tokens b0 + lane8 + 8q, q < 4. A and B tiles are staged in shared memory; the
// squared norms come from the same staged values, so the metric is read once per tile.
template <typename scalar_t, bool kVec>
__global__ void __launch_bounds__(kMatchThreads) tome_match_kernel(
    const scalar_t* __restrict__ metric, score_t<scalar_t>* __restrict__ best,
    int32_t* __restrict__ best_idx, int64_t tokens, int64_t num_a, int64_t num_b, int64_t dim_m,
    bool class_token, bool distill_token) {
  using acc_t = score_t<scalar_t>;
  __shared__ acc_t a_tile[kMatchTile][kMatchK + 1];
  __shared__ acc_t b_tile[kMatchTile][kMatchK + 1];
  __shared__ acc_t inv_b[kMatchTile];
  const int tid = threadIdx.x, row = tid / 8, lane8 = tid % 8;
  const int64_t batch = blockIdx.y;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * kMatchTile;
  const scalar_t* mb = metric + batch * tokens * dim_m;
  const int64_t a_token = a0 + row;

  // Stage rows [first, first + 32) of side (A: tokens 2i, B: tokens 2i + 1), channels k0.. .
  auto stage = [&](acc_t (*tile)[kMatchK + 1], int64_t first, int64_t count, int parity,
                   int64_t k0, int slot, int slots) {
    if constexpr (kVec) {
      constexpr int per_row = kMatchK / kPack<scalar_t>;
      for (int p = slot; p < kMatchTile * per_row; p += slots) {
        const int tr = p / per_row, tk = (p % per_row) * kPack<scalar_t>;
        Pack<scalar_t> pack{};
        if (first + tr < count && k0 + tk < dim_m) {
          pack = load_pack(mb + (2 * (first + tr) + parity) * dim_m + k0 + tk);
        }
#pragma unroll
        for (int e = 0; e < kPack<scalar_t>; ++e) tile[tr][tk + e] = static_cast<acc_t>(pack.v[e]);
      }
    } else {
      for (int p = slot; p < kMatchTile * kMatchK; p += slots) {
        const int tr = p / kMatchK, tk = p % kMatchK;
        tile[tr][tk] = first + tr < count && k0 + tk < dim_m
                           ? static_cast<acc_t>(mb[(2 * (first + tr) + parity) * dim_m + k0 + tk])
                           : acc_t(0);
      }
    }
  };

  // Squared norms from the staged tiles: thread (row, lane8) adds channels lane8 + 8m of A row
  // `row` (first B tile only) and of B row `row`; the row's 8 threads then add up by shuffles.
  auto row_sum8 = [](acc_t v) {
#pragma unroll
    for (int offset = 1; offset < 8; offset <<= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
  };
  acc_t best_v = -std::numeric_limits<acc_t>::infinity();
  int32_t best_j = 0;
  acc_t sq_a = 0, inv_a = 0;
  for (int64_t b0 = 0; b0 < num_b; b0 += kMatchTile) {
    acc_t acc[kMatchCols] = {};
    acc_t sq_b = 0;
    for (int64_t k0 = 0; k0 < dim_m; k0 += kMatchK) {
      // half of the threads stage A, the other half B
      if (tid < kMatchThreads / 2) {
        stage(a_tile, a0, num_a, 0, k0, tid, kMatchThreads / 2);
      } else {
        stage(b_tile, b0, num_b, 1, k0, tid - kMatchThreads / 2, kMatchThreads / 2);
      }
      __syncthreads();
#pragma unroll
      for (int k = lane8; k < kMatchK; k += 8) {
        sq_b += b_tile[row][k] * b_tile[row][k];
        if (b0 == 0) sq_a += a_tile[row][k] * a_tile[row][k];
      }
#pragma unroll 8
      for (int k = 0; k < kMatchK; ++k) {
        const acc_t a = a_tile[row][k];
#pragma unroll
        for (int q = 0; q < kMatchCols; ++q) acc[q] += a * b_tile[lane8 + 8 * q][k];
      }
      __syncthreads();
    }
    // 1 / max(|m|, eps), as the other backends: a zero row scores 0, never 0 * inf = NaN
    if (b0 == 0) inv_a = acc_t(1) / max(sqrt(row_sum8(sq_a)), acc_t(kCosineEps));
    sq_b = row_sum8(sq_b);
    if (lane8 == 0) inv_b[row] = acc_t(1) / max(sqrt(sq_b), acc_t(kCosineEps));
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kMatchCols; ++q) {
      const int64_t j = b0 + lane8 + 8 * q;
      if (j >= num_b || (distill_token && j == 0)) continue;
      const acc_t score = acc[q] * inv_a * inv_b[lane8 + 8 * q];
      // strict: the earliest index wins a tie, as torch.max; a NaN score never wins
      if (score > best_v) {
        best_v = score;
        best_j = static_cast<int32_t>(j);
      }
    }
    __syncthreads();  // inv_b is rewritten by the next tile
  }
#pragma unroll
  for (int offset = 1; offset < 8; offset <<= 1) {  // best of the row's 8 threads
    const acc_t other_v = __shfl_xor_sync(0xffffffffu, best_v, offset);
    const int32_t other_j = __shfl_xor_sync(0xffffffffu, best_j, offset);
    if (other_v > best_v || (other_v == best_v && other_j < best_j)) {
      best_v = other_v;
      best_j = other_j;
    }
  }
  if (lane8 == 0 && a_token < num_a) {
    // the class token never merges: its best is NaN, which the rank sorts after every token
    const bool protected_token = class_token && a_token == 0;
    best[batch * num_a + a_token] =
        protected_token ? std::numeric_limits<acc_t>::quiet_NaN() : best_v;
    best_idx[batch * num_a + a_token] = best_j;
  }
}

// ---- ToMe: rank and plan -------------------------------------------------------------------

constexpr int kPlanThreads = 128;

// rank[i] = place of A token i in the stable descending sort of best, NaN last: the tokens with
// a higher score, plus the earlier ones with the same score (torch's stable argsort), a number
// always before a NaN; a permutation whatever the scores, so the plan's slots are. Block (i tile,
// batch); scores are staged through shared memory one tile at a time.
template <typename acc_t>
__global__ void __launch_bounds__(kPlanThreads) tome_rank_kernel(
    const acc_t* __restrict__ best, int32_t* __restrict__ rank, int64_t num_a) {
  __shared__ acc_t tile[kPlanThreads];
  const int64_t batch = blockIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kPlanThreads + threadIdx.x;
  const acc_t* bb = best + batch * num_a;
  const acc_t v = i < num_a ? bb[i] : acc_t(0);
  int32_t before = 0;
  for (int64_t j0 = 0; j0 < num_a; j0 += kPlanThreads) {
    const int64_t j = j0 + threadIdx.x;
    tile[threadIdx.x] = j < num_a ? bb[j] : acc_t(0);
    __syncthreads();
    const int n = static_cast<int>(std::min<int64_t>(kPlanThreads, num_a - j0));
    for (int k = 0; k < n; ++k) {
      const acc_t w = tile[k];
      const bool higher = !isnan(w) && (isnan(v) || w > v);
      const bool same = w == v || (isnan(w) && isnan(v));
      before += higher || (same && j0 + k < i);
    }
    __syncthreads();
  }
  if (i < num_a) rank[batch * num_a + i] = before;
}

// Thread t of block (tile, batch) places A token i = t and B token d = t in the plan. A tokens
// with rank < r merge into their best match; the others are kept, in token order with a class
// token, else in rank (score) order, as ToMe. Merged tokens are listed by destination, then
// token order, so each B token's list is contiguous.
__global__ void __launch_bounds__(kPlanThreads) tome_plan_kernel(
    const int32_t* __restrict__ rank, const int32_t* __restrict__ best_idx,
    int32_t* __restrict__ primary, int32_t* __restrict__ begin, int32_t* __restrict__ count,
    int32_t* __restrict__ sources, int64_t num_a, int64_t num_b, int64_t n_out, int64_t r,
    bool class_token, bool distill_token) {
  __shared__ int32_t tile_rank[kPlanThreads];
  __shared__ int32_t tile_dst[kPlanThreads];
  const int64_t batch = blockIdx.y;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kPlanThreads + threadIdx.x;
  const int32_t* rb = rank + batch * num_a;
  const int32_t* db = best_idx + batch * num_a;
  const int32_t rank_i = t < num_a ? rb[t] : 0;
  const int32_t dst_i = t < num_a ? db[t] : 0;
  int32_t kept_before = 0, merged_before = 0, count_d = 0, begin_d = 0;
  for (int64_t j0 = 0; j0 < num_a; j0 += kPlanThreads) {
    const int64_t j = j0 + threadIdx.x;
    tile_rank[threadIdx.x] = j < num_a ? rb[j] : 0;
    tile_dst[threadIdx.x] = j < num_a ? db[j] : 0;
    __syncthreads();
    const int n = static_cast<int>(std::min<int64_t>(kPlanThreads, num_a - j0));
    for (int k = 0; k < n; ++k) {
      const bool merged = tile_rank[k] < r, earlier = j0 + k < t;
      const int32_t dst = tile_dst[k];
      kept_before += !merged && earlier;
      merged_before += merged && (dst < dst_i || (dst == dst_i && earlier));
      count_d += merged && dst == t;
      begin_d += merged && dst < t;
    }
    __syncthreads();
  }
  int32_t* pb = primary + batch * n_out;
  int32_t* gb = begin + batch * n_out;
  int32_t* cb = count + batch * n_out;
  if (t < num_a) {
    if (rank_i < r) {
      sources[batch * r + merged_before] = static_cast<int32_t>(2 * t);
    } else {
      const int64_t place = class_token ? kept_before : rank_i - r;
      const int64_t slot = distill_token && place > 0 ? place + 1 : place;  // dist token second
      pb[slot] = static_cast<int32_t>(2 * t);
      gb[slot] = 0;
      cb[slot] = 0;
    }
  }
  if (t < num_b) {  // after the num_a - r kept A tokens; the distillation token second
    const int64_t slot = distill_token && t == 0 ? 1 : num_a - r + t;
    pb[slot] = static_cast<int32_t>(2 * t + 1);
    gb[slot] = begin_d;
    cb[slot] = count_d;
  }
}

TomePlan tome_merge_plan_cuda(const at::Tensor& metric, int64_t r, bool class_token,
                              bool distill_token) {
  const int64_t batch = metric.size(0), tokens = metric.size(1), dim_m = metric.size(2);
  const int64_t num_a = (tokens + 1) / 2, num_b = tokens / 2, n_out = tokens - r;
  const auto int_opts = metric.options().dtype(at::kInt);
  const auto score_type = metric.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor best = at::empty({batch, num_a}, metric.options().dtype(score_type));
  at::Tensor best_idx = at::empty({batch, num_a}, int_opts);
  at::Tensor rank = at::empty({batch, num_a}, int_opts);
  TomePlan plan{at::empty({batch, n_out}, int_opts), at::empty({batch, n_out}, int_opts),
                at::empty({batch, n_out}, int_opts), at::empty({batch, r}, int_opts)};
  const auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 match_grid((num_a + kMatchTile - 1) / kMatchTile, batch);
  const dim3 plan_grid((num_a + kPlanThreads - 1) / kPlanThreads, batch);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, metric.scalar_type(), "tome_match", [&] {
    using acc_t = score_t<scalar_t>;
    const scalar_t* m = metric.data_ptr<scalar_t>();
    auto* best_ptr = best.data_ptr<acc_t>();
    if (packs_fit<scalar_t>(m, dim_m) && kMatchK % kPack<scalar_t> == 0) {
      tome_match_kernel<scalar_t, true><<<match_grid, kMatchThreads, 0, stream>>>(
          m, best_ptr, best_idx.data_ptr<int32_t>(), tokens, num_a, num_b, dim_m, class_token,
          distill_token);
    } else {
      tome_match_kernel<scalar_t, false><<<match_grid, kMatchThreads, 0, stream>>>(
          m, best_ptr, best_idx.data_ptr<int32_t>(), tokens, num_a, num_b, dim_m, class_token,
          distill_token);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    tome_rank_kernel<acc_t><<<plan_grid, kPlanThreads, 0, stream>>>(
        best_ptr, rank.data_ptr<int32_t>(), num_a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  tome_plan_kernel<<<plan_grid, kPlanThreads, 0, stream>>>(
      rank.data_ptr<int32_t>(), best_idx.data_ptr<int32_t>(), plan.primary.data_ptr<int32_t>(),
      plan.begin.data_ptr<int32_t>(), plan.count.data_ptr<int32_t>(),
      plan.sources.data_ptr<int32_t>(), num_a, num_b, n_out, r, class_token, distill_token);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return plan;
}

// ---- ToMe: gather-merge --------------------------------------------------------------------

constexpr int kStagedSources = 128;

// Block (output token, batch). The merged-in tokens' indices and sizes are staged in shared
// memory (kStagedSources at a time), so the row loop reads only x: 16-byte packs (kVec) or
// scalars. The channel loop runs the same trip count in every thread (barriers inside).
template <typename scalar_t, bool kVec>
__global__ void weighted_gather_kernel(const scalar_t* __restrict__ x,
                                       const scalar_t* __restrict__ size,
                                       const int32_t* __restrict__ primary,
                                       const int32_t* __restrict__ begin,
                                       const int32_t* __restrict__ count,
                                       const int32_t* __restrict__ sources,
                                       scalar_t* __restrict__ out, scalar_t* __restrict__ size_out,
                                       int64_t tokens, int64_t n_out, int64_t channels, int64_t r) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int P = kVec ? kPack<scalar_t> : 1;
  __shared__ int32_t staged_src[kStagedSources];
  __shared__ acc_t staged_size[kStagedSources];
  const int64_t b = blockIdx.y;
  const int64_t row = b * n_out + blockIdx.x;
  const int64_t own = primary[row];
  const int num = count[row];
  const int32_t* list = sources + b * r + begin[row];
  const scalar_t* xb = x + b * tokens * channels;
  const scalar_t* sb = size != nullptr ? size + b * tokens : nullptr;
  const acc_t own_size = load_size<acc_t>(sb, own);
  const scalar_t* own_row = xb + own * channels;
  scalar_t* dst = out + row * channels;
  acc_t total = own_size;
  for (int64_t c0 = 0; c0 < channels; c0 += static_cast<int64_t>(blockDim.x) * P) {
    const int64_t c = c0 + static_cast<int64_t>(threadIdx.x) * P;
    const bool active = c < channels;
    Pack<scalar_t> pack{};
    if (active) {
      if constexpr (kVec) {
        pack = load_pack(own_row + c);
      } else {
        pack.v[0] = own_row[c];
      }
    }
    acc_t acc[P];
#pragma unroll
    for (int e = 0; e < P; ++e) acc[e] = static_cast<acc_t>(pack.v[e]) * own_size;
    total = own_size;
    for (int k0 = 0; k0 < num; k0 += kStagedSources) {
      const int n = num - k0 < kStagedSources ? num - k0 : kStagedSources;
      __syncthreads();  // the previous chunk's readers are done
      for (int k = threadIdx.x; k < n; k += blockDim.x) {
        const int32_t src = list[k0 + k];
        staged_src[k] = src;
        staged_size[k] = load_size<acc_t>(sb, src);
      }
      __syncthreads();
      for (int k = 0; k < n; ++k) {
        const acc_t s = staged_size[k];
        total += s;
        if (!active) continue;
        const scalar_t* src_row = xb + static_cast<int64_t>(staged_src[k]) * channels + c;
        Pack<scalar_t> other;
        if constexpr (kVec) {
          other = load_pack(src_row);
        } else {
          other.v[0] = *src_row;
        }
#pragma unroll
        for (int e = 0; e < P; ++e) acc[e] += static_cast<acc_t>(other.v[e]) * s;
      }
    }
    if (!active) continue;
    if (num > 0) {  // else the own token is copied bit-exactly
#pragma unroll
      for (int e = 0; e < P; ++e) pack.v[e] = static_cast<scalar_t>(acc[e] / total);
    }
    if constexpr (kVec) {
      store_pack(dst + c, pack);
    } else {
      dst[c] = pack.v[0];
    }
  }
  if (threadIdx.x == 0) size_out[row] = static_cast<scalar_t>(total);
}

std::tuple<at::Tensor&, at::Tensor&> tome_merge_out_cuda(
    const at::Tensor& x, const at::Tensor& metric, int64_t r, const std::optional<at::Tensor>& size,
    bool class_token, bool distill_token, at::Tensor& out, at::Tensor& size_out) {
  const int64_t eff_r = check_tome_merge_inputs(x, metric, r, size, class_token, distill_token);
  check_merge_outputs("tome_merge", x, x.size(1) - eff_r, out, &size_out);
  TORCH_CHECK(x.is_cuda(), "tome_merge (cuda): x must be a CUDA tensor");
  check_grid_batch("tome_merge", x);
  const c10::cuda::CUDAGuard guard(x.device());
  if (eff_r == 0) {
    out.copy_(x);
    size.has_value() ? size_out.copy_(*size) : size_out.fill_(1);
    return {out, size_out};
  }
  const int64_t rows = out.size(0) * out.size(1);
  if (rows == 0 || x.size(2) == 0) return {out, size_out};
  const TomePlan plan = tome_merge_plan_cuda(metric.contiguous(), eff_r, class_token, distill_token);
  const at::Tensor xc = x.contiguous();
  const at::Tensor sc = size.has_value() ? size->contiguous() : at::Tensor();
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t channels = x.size(2);
  const dim3 grid(out.size(1), out.size(0));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tome_merge_cuda", [&] {
    const scalar_t* xs = xc.data_ptr<scalar_t>();
    scalar_t* os = out.data_ptr<scalar_t>();
    const scalar_t* ss = size.has_value() ? sc.data_ptr<scalar_t>() : nullptr;
    const bool vec = packs_fit<scalar_t>(xs, channels) && packs_fit<scalar_t>(os, channels);
    auto launch = [&](auto kernel, int per_thread) {
      kernel<<<grid, row_threads(channels, per_thread, 256), 0, stream>>>(
          xs, ss, plan.primary.data_ptr<int32_t>(), plan.begin.data_ptr<int32_t>(),
          plan.count.data_ptr<int32_t>(), plan.sources.data_ptr<int32_t>(), os,
          size_out.data_ptr<scalar_t>(), x.size(1), out.size(1), channels, eff_r);
    };
    if (vec) {
      launch(weighted_gather_kernel<scalar_t, true>, kPack<scalar_t>);
    } else {
      launch(weighted_gather_kernel<scalar_t, false>, 1);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, size_out};
}

// ---- ATME ----------------------------------------------------------------------------------

// Block (output token, batch), float math (float64 is refused). The pair test is uniform
// across the block, so every thread or none reaches block_sum's barriers. kVec: the metric and
// the token rows are read and written as 16-byte packs.
template <typename scalar_t, bool kVec>
__global__ void atme_merge_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ metric,
                                  const scalar_t* __restrict__ size, scalar_t* __restrict__ out,
                                  scalar_t* __restrict__ size_out, int64_t tokens, int64_t n_out,
                                  int64_t channels, int64_t dim_m, AtmeLayout g) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int P = kPack<scalar_t>;
  __shared__ float scratch[32];
  const int64_t b = blockIdx.y, o = blockIdx.x;
  const int64_t row = b * n_out + o;
  int64_t dst = o, src = -1;
  if (o >= g.prefix) {  // one division per block, not per element
    const int64_t i = (o - g.prefix) / g.out_cols, j = (o - g.prefix) - i * g.out_cols;
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
    if constexpr (kVec) {
      for (int64_t c = static_cast<int64_t>(threadIdx.x) * P; c < channels; c += blockDim.x * P) {
        store_pack(out_row + c, load_pack(x_dst + c));
      }
    } else {
      for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) out_row[c] = x_dst[c];
    }
    if (threadIdx.x == 0) size_out[row] = static_cast<scalar_t>(load_size<float>(sb, dst));
    return;
  }
  const scalar_t* m_dst = metric + (b * tokens + dst) * dim_m;
  const scalar_t* m_src = metric + (b * tokens + src) * dim_m;
  float dot = 0.f, sq_dst = 0.f, sq_src = 0.f;
  if constexpr (kVec) {
    for (int64_t k = static_cast<int64_t>(threadIdx.x) * P; k < dim_m; k += blockDim.x * P) {
      const Pack<scalar_t> pd = load_pack(m_dst + k), ps = load_pack(m_src + k);
#pragma unroll
      for (int e = 0; e < P; ++e) {
        const float a = static_cast<float>(pd.v[e]), c = static_cast<float>(ps.v[e]);
        dot += a * c;
        sq_dst += a * a;
        sq_src += c * c;
      }
    }
  } else {
    for (int64_t k = threadIdx.x; k < dim_m; k += blockDim.x) {
      const float a = static_cast<float>(m_dst[k]), c = static_cast<float>(m_src[k]);
      dot += a * c;
      sq_dst += a * a;
      sq_src += c * c;
    }
  }
  dot = block_sum(dot, scratch);
  sq_dst = block_sum(sq_dst, scratch);
  sq_src = block_sum(sq_src, scratch);
  const float cos = dot / fmaxf(sqrtf(sq_dst) * sqrtf(sq_src), static_cast<float>(kCosineEps));
  // the destination absorbs the share w = (1 + max(cos, 0)) / 2 of the source (at least half:
  // no token is dropped), and only that share's size (fmaxf returns its number operand: a
  // NaN similarity counts as dissimilar, as elsewhere)
  const float absorbed = (1.f + fmaxf(cos, 0.f)) * 0.5f * load_size<float>(sb, src);
  const float new_size = load_size<float>(sb, dst) + absorbed;
  const acc_t alpha = absorbed / new_size;
  const scalar_t* x_src = x + (b * tokens + src) * channels;
  if constexpr (kVec) {
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * P; c < channels; c += blockDim.x * P) {
      Pack<scalar_t> pd = load_pack(x_dst + c);
      const Pack<scalar_t> ps = load_pack(x_src + c);
#pragma unroll
      for (int e = 0; e < P; ++e) {
        pd.v[e] = static_cast<scalar_t>((1 - alpha) * static_cast<acc_t>(pd.v[e]) +
                                        alpha * static_cast<acc_t>(ps.v[e]));
      }
      store_pack(out_row + c, pd);
    }
  } else {
    for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) {
      out_row[c] = static_cast<scalar_t>((1 - alpha) * static_cast<acc_t>(x_dst[c]) +
                                         alpha * static_cast<acc_t>(x_src[c]));
    }
  }
  if (threadIdx.x == 0) size_out[row] = static_cast<scalar_t>(new_size);
}

std::tuple<at::Tensor&, at::Tensor&> atme_merge_out_cuda(
    const at::Tensor& x, const at::Tensor& metric, int64_t grid_h, int64_t grid_w,
    c10::string_view axis, int64_t num_prefix_tokens, const std::optional<at::Tensor>& size,
    at::Tensor& out, at::Tensor& size_out) {
  const AtmeLayout g = atme_layout("atme_merge", x, grid_h, grid_w, axis, num_prefix_tokens, false);
  check_atme_merge_inputs(x, metric, size);
  check_merge_outputs("atme_merge", x, g.out_tokens(), out, &size_out);
  TORCH_CHECK(x.is_cuda(), "atme_merge (cuda): x must be a CUDA tensor");
  check_grid_batch("atme_merge", x);
  TORCH_CHECK(x.scalar_type() != at::kDouble,
              "atme_merge (cuda): float64 is not supported; use the torch backend");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), mc = metric.contiguous();
  const at::Tensor sc = size.has_value() ? size->contiguous() : at::Tensor();
  if (out.numel() == 0) return {out, size_out};
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t channels = x.size(2), dim_m = metric.size(2);
  const dim3 grid(out.size(1), out.size(0));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "atme_merge_cuda", [&] {
    const scalar_t* xs = xc.data_ptr<scalar_t>();
    const scalar_t* ms = mc.data_ptr<scalar_t>();
    scalar_t* os = out.data_ptr<scalar_t>();
    const bool vec = packs_fit<scalar_t>(xs, channels) && packs_fit<scalar_t>(os, channels) &&
                     packs_fit<scalar_t>(ms, dim_m);
    const int per_thread = vec ? kPack<scalar_t> : 1;
    const int threads = row_threads(std::max(channels, dim_m), per_thread, kRowThreads);
    auto launch = [&](auto kernel) {
      kernel<<<grid, threads, 0, stream>>>(
          xs, ms, size.has_value() ? sc.data_ptr<scalar_t>() : nullptr, os,
          size_out.data_ptr<scalar_t>(), x.size(1), out.size(1), channels, dim_m, g);
    };
    vec ? launch(atme_merge_kernel<scalar_t, true>) : launch(atme_merge_kernel<scalar_t, false>);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, size_out};
}

// Block (restored token, batch) copies the row of the merged token it came from.
template <typename scalar_t, bool kVec>
__global__ void atme_unmerge_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                    int64_t channels, int64_t n_in, int64_t n_full, AtmeLayout g) {
  const int64_t b = blockIdx.y, t = blockIdx.x;
  int64_t source = t;
  if (t >= g.prefix) {  // one division per block
    const int64_t i = (t - g.prefix) / g.cols, j = (t - g.prefix) - i * g.cols;
    source = g.prefix + (g.axis_w ? i * g.out_cols + j / 2 : (i / 2) * g.out_cols + j);
  }
  const scalar_t* in_row = x + (b * n_in + source) * channels;
  scalar_t* out_row = out + (b * n_full + t) * channels;
  if constexpr (kVec) {
    constexpr int P = kPack<scalar_t>;
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * P; c < channels; c += blockDim.x * P) {
      store_pack(out_row + c, load_pack(in_row + c));
    }
  } else {
    for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) out_row[c] = in_row[c];
  }
}

at::Tensor& atme_unmerge_out_cuda(const at::Tensor& x, int64_t grid_h, int64_t grid_w,
                                  c10::string_view axis, int64_t num_prefix_tokens,
                                  at::Tensor& out) {
  const AtmeLayout g = atme_layout("atme_unmerge", x, grid_h, grid_w, axis, num_prefix_tokens, true);
  check_merge_outputs("atme_unmerge", x, g.in_tokens(), out, nullptr);
  TORCH_CHECK(x.is_cuda(), "atme_unmerge (cuda): x must be a CUDA tensor");
  check_grid_batch("atme_unmerge", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  if (out.numel() == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t channels = x.size(2);
  const dim3 grid(g.in_tokens(), x.size(0));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "atme_unmerge_cuda", [&] {
    const scalar_t* xs = xc.data_ptr<scalar_t>();
    scalar_t* os = out.data_ptr<scalar_t>();
    const bool vec = packs_fit<scalar_t>(xs, channels) && packs_fit<scalar_t>(os, channels);
    const int threads = row_threads(channels, vec ? kPack<scalar_t> : 1, kRowThreads);
    auto launch = [&](auto kernel) {
      kernel<<<grid, threads, 0, stream>>>(xs, os, channels, g.out_tokens(), g.in_tokens(), g);
    };
    vec ? launch(atme_unmerge_kernel<scalar_t, true>) : launch(atme_unmerge_kernel<scalar_t, false>);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dcvit, CUDA, m) {
  impl_with_out<&tome_merge_outputs, &tome_merge_out_cuda>(m, "tome_merge");
  impl_with_out<&atme_merge_outputs, &atme_merge_out_cuda>(m, "atme_merge");
  impl_with_out<&atme_unmerge_outputs, &atme_unmerge_out_cuda>(m, "atme_unmerge");
}

}  // namespace dcvit
