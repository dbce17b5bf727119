// See cpu_attention.h. The AVX512 code is compiled with function target attributes and only
// called after a runtime CPU check, so the library still loads and runs on other x86 CPUs.
#include "cpu_attention.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DCVIT_HAVE_X86 1
#endif

namespace dcvit {

#ifdef DCVIT_HAVE_X86

namespace {

#define DCVIT_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

// Above this many tokens the fp32 score rows of one head (N x N floats) leave the L2 cache;
// longer sequences go to ATen's flash kernel, which tiles them.
constexpr int64_t kMaxTokens = 1024;
constexpr int64_t kLanes = 16;  // fp32 lanes of a 512-bit register

int64_t round_up(int64_t value, int64_t step) { return (value + step - 1) / step * step; }

// e^x in fp32 for the softmax's x - max <= 0: x = n ln2 + r, |r| <= ln2 / 2, e^r by the Cephes
// expf polynomial (relative error ~1e-7, far below the bf16 rounding of P that follows), times
// 2^n by scalef. Below -104 the result is 0 (also for -inf, where the reduction would give NaN).
DCVIT_AVX512_BF16 inline __m512 exp_ps(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512 result = _mm512_scalef_ps(p, n);
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-104.0f), _CMP_LT_OQ);
  return _mm512_mask_mov_ps(result, tiny, _mm512_setzero_ps());
}

DCVIT_AVX512_BF16 inline __m512i broadcast_pair(const uint16_t* pair) {
  int32_t bits;
  std::memcpy(&bits, pair, sizeof bits);
  return _mm512_set1_epi32(bits);
}

// s[r][j..j+16C) = sum over t of q[r][2t..2t+1] . kp[t][j..j+16C): R query rows against 16C keys;
// kp holds k as bf16 pairs (VNNI layout, one 32-bit word per key and pair of channels).
template <int R, int C>
DCVIT_AVX512_BF16 void score_tile(const uint16_t* q, int64_t q_stride, const uint32_t* kp,
                                  int64_t keys_padded, int64_t pairs, int64_t j, float* s,
                                  int64_t s_stride) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < pairs; ++t) {
    __m512i keys[C];
    for (int c = 0; c < C; ++c)
      keys[c] = _mm512_loadu_si512(kp + t * keys_padded + j + c * kLanes);
    for (int r = 0; r < R; ++r) {
      const __m512i qq = broadcast_pair(q + r * q_stride + 2 * t);
      for (int c = 0; c < C; ++c)
        acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)qq, (__m512bh)keys[c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(s + r * s_stride + j + c * kLanes, acc[r][c]);
}

template <int R>
DCVIT_AVX512_BF16 void score_rows(const uint16_t* q, int64_t q_stride, const uint32_t* kp,
                                  int64_t keys_padded, int64_t pairs, float* s, int64_t s_stride) {
  int64_t j = 0;
  for (; j + 2 * kLanes <= keys_padded; j += 2 * kLanes)
    score_tile<R, 2>(q, q_stride, kp, keys_padded, pairs, j, s, s_stride);
  if (j < keys_padded) score_tile<R, 1>(q, q_stride, kp, keys_padded, pairs, j, s, s_stride);
}

// o[r][e0..e0+16C) = sum over t of p[r][2t..2t+1] . vp[t][e0..e0+16C): vp holds v as bf16
// pairs of consecutive keys (VNNI layout).
template <int R, int C>
DCVIT_AVX512_BF16 void value_tile(const uint16_t* p, int64_t p_stride, const uint32_t* vp,
                                  int64_t width_padded, int64_t pairs, int64_t e0, float* o,
                                  int64_t o_stride) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < pairs; ++t) {
    __m512i vals[C];
    for (int c = 0; c < C; ++c)
      vals[c] = _mm512_loadu_si512(vp + t * width_padded + e0 + c * kLanes);
    for (int r = 0; r < R; ++r) {
      const __m512i pp = broadcast_pair(p + r * p_stride + 2 * t);
      for (int c = 0; c < C; ++c)
        acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)pp, (__m512bh)vals[c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(o + r * o_stride + e0 + c * kLanes, acc[r][c]);
}

template <int R>
DCVIT_AVX512_BF16 void value_rows(const uint16_t* p, int64_t p_stride, const uint32_t* vp,
                                  int64_t width_padded, int64_t pairs, float* o, int64_t o_stride) {
  int64_t e = 0;
  for (; e + 4 * kLanes <= width_padded; e += 4 * kLanes)
    value_tile<R, 4>(p, p_stride, vp, width_padded, pairs, e, o, o_stride);
  for (; e < width_padded; e += kLanes)
    value_tile<R, 1>(p, p_stride, vp, width_padded, pairs, e, o, o_stride);
}

// Row tails: the register-tile height R is a template argument, so rows 1..8 are dispatched.
#define DCVIT_ROWS_SWITCH(rows, CALL) \
  switch (rows) {                      \
    case 8: CALL(8); break;            \
    case 7: CALL(7); break;            \
    case 6: CALL(6); break;            \
    case 5: CALL(5); break;            \
    case 4: CALL(4); break;            \
    case 3: CALL(3); break;            \
    case 2: CALL(2); break;            \
    default: CALL(1); break;           \
  }

struct HeadShape {
  int64_t tokens, qk_width, v_width;
  int64_t keys_padded;   // keys rounded up to 16: score columns
  int64_t key_pairs;     // (keys + 1) / 2: P columns and v rows in pairs
  int64_t width_padded;  // v width rounded up to 16
};

// One thread's buffers, reused across the (batch, head) pairs it runs.
struct Scratch {
  std::vector<uint32_t> kp, vp;
  std::vector<float> scores, out;
  std::vector<uint16_t> probs;
  std::vector<float> inv_sum, bias;
  explicit Scratch(const HeadShape& s)
      : kp(s.qk_width / 2 * s.keys_padded),
        vp(s.key_pairs * s.width_padded),
        scores(s.tokens * s.keys_padded),
        out(s.tokens * s.width_padded),
        probs(s.tokens * 2 * s.key_pairs),
        inv_sum(s.tokens),
        bias(s.keys_padded) {}
};

// One (batch, head): q, k, v point at token 0 of the head, rows `*_stride` elements apart;
// bias: the mask row for this batch (fp32, keys long) or null; dst: (tokens, v_width) bf16.
DCVIT_AVX512_BF16 void attend_head(const uint16_t* q, int64_t q_stride, const uint16_t* k,
                                   int64_t k_stride, const uint16_t* v, int64_t v_stride,
                                   const float* bias, float scale, const HeadShape& hs,
                                   Scratch& sc, uint16_t* dst) {
  const int64_t n = hs.tokens, pairs = hs.qk_width / 2, kpad = hs.keys_padded;
  const int64_t p_stride = 2 * hs.key_pairs, wpad = hs.width_padded;
  // k to pairs of channels per key; padded keys are zero (their scores are masked below)
  for (int64_t t = 0; t < pairs; ++t) {
    uint32_t* row = sc.kp.data() + t * kpad;
    for (int64_t j = 0; j < n; ++j) std::memcpy(row + j, k + j * k_stride + 2 * t, 4);
    std::fill(row + n, row + kpad, 0u);
  }
  // v to pairs of keys per channel; a missing odd key and padded channels are zero
  for (int64_t t = 0; t < hs.key_pairs; ++t) {
    uint32_t* row = sc.vp.data() + t * wpad;
    const uint16_t* v0 = v + 2 * t * v_stride;
    const uint16_t* v1 = 2 * t + 1 < n ? v0 + v_stride : nullptr;
    for (int64_t e = 0; e < hs.v_width; ++e)
      row[e] = uint32_t(v0[e]) | (v1 ? uint32_t(v1[e]) << 16 : 0u);
    std::fill(row + hs.v_width, row + wpad, 0u);
  }
  // scores, 8 query rows at a time
  for (int64_t i = 0; i < n; i += 8) {
    const int64_t rows = std::min<int64_t>(8, n - i);
#define DCVIT_SCORE(R)                                                              \
  score_rows<R>(q + i * q_stride, q_stride, sc.kp.data(), kpad, pairs, sc.scores.data() + i * kpad, \
                kpad)
    DCVIT_ROWS_SWITCH(rows, DCVIT_SCORE)
#undef DCVIT_SCORE
  }
  // softmax rows: fp32 exponentials, their fp32 sum, P = bf16(exp) (unnormalized)
  const __m512 scale_v = _mm512_set1_ps(scale);
  const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < n; ++i) {
    float* row = sc.scores.data() + i * kpad;
    __m512 max_v = neg_inf;
    for (int64_t j = 0; j < kpad; j += kLanes) {
      const __mmask16 live = j + kLanes <= n ? __mmask16(0xFFFF)
                             : j < n         ? __mmask16((1u << (n - j)) - 1)
                                             : __mmask16(0);
      __m512 x = _mm512_mul_ps(_mm512_loadu_ps(row + j), scale_v);
      if (bias) x = _mm512_add_ps(x, _mm512_loadu_ps(bias + j));
      x = _mm512_mask_mov_ps(neg_inf, live, x);
      _mm512_storeu_ps(row + j, x);
      max_v = _mm512_max_ps(max_v, x);
    }
    const __m512 row_max = _mm512_set1_ps(_mm512_reduce_max_ps(max_v));
    __m512 sum_v = _mm512_setzero_ps();
    uint16_t* prob = sc.probs.data() + i * p_stride;
    for (int64_t j = 0; j < p_stride; j += kLanes) {
      const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(row + j), row_max));
      sum_v = _mm512_add_ps(sum_v, e);
      const __m256i bf = (__m256i)_mm512_cvtneps_pbh(e);
      const int64_t left = p_stride - j;
      const __mmask16 keep = left >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      _mm256_mask_storeu_epi16(prob + j, keep, bf);
    }
    sc.inv_sum[i] = 1.0f / _mm512_reduce_add_ps(sum_v);
  }
  // P V, then 1 / sum and the bf16 rounding on the way out
  for (int64_t i = 0; i < n; i += 8) {
    const int64_t rows = std::min<int64_t>(8, n - i);
    // at most 4 rows x 4 column blocks per tile: 16 accumulators, 4 value registers
    for (int64_t i4 = i; i4 < i + rows; i4 += 4) {
      const int64_t part = std::min<int64_t>(4, i + rows - i4);
#define DCVIT_VALUE(R)                                                                      \
  value_rows<R>(sc.probs.data() + i4 * p_stride, p_stride, sc.vp.data(), wpad, hs.key_pairs, \
                sc.out.data() + i4 * wpad, wpad)
      DCVIT_ROWS_SWITCH(part, DCVIT_VALUE)
#undef DCVIT_VALUE
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const __m512 inv = _mm512_set1_ps(sc.inv_sum[i]);
    for (int64_t e = 0; e < hs.v_width; e += kLanes) {
      const __m512 o = _mm512_mul_ps(_mm512_loadu_ps(sc.out.data() + i * wpad + e), inv);
      const int64_t left = hs.v_width - e;
      const __mmask16 keep = left >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      _mm256_mask_storeu_epi16(dst + i * hs.v_width + e, keep, (__m256i)_mm512_cvtneps_pbh(o));
    }
  }
}

}  // namespace

bool cpu_attention_bf16_supported() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512bf16");
  return ok;
}

CpuAttentionCore cpu_attention_bf16_core() {
  // read per call (a getenv, far below one head's work) so tests can pin either core
  const char* pinned = std::getenv("DCVIT_CPU_ATTENTION");
  if (pinned != nullptr && std::strcmp(pinned, "aten") == 0) return CpuAttentionCore::kAten;
  if (!cpu_attention_bf16_supported()) return CpuAttentionCore::kAten;
  if (pinned != nullptr && std::strcmp(pinned, "own") == 0) return CpuAttentionCore::kOwn;
  // could_pack: ATen's brgemm runs on AMX tiles here, and so do its flash kernel's block products
  static const bool amx = at::native::cpublas::could_pack(at::kBFloat16);
  return amx ? CpuAttentionCore::kAten : CpuAttentionCore::kOwn;
}

std::optional<at::Tensor> cpu_attention_bf16(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v,
                                             const std::optional<at::Tensor>& mask, double scale) {
  if (cpu_attention_bf16_core() != CpuAttentionCore::kOwn) return std::nullopt;
  for (const at::Tensor* t : {&q, &k, &v}) {
    if (!t->device().is_cpu() || t->scalar_type() != at::kBFloat16 || t->dim() != 4 ||
        t->stride(3) != 1)
      return std::nullopt;
  }
  const int64_t batch = q.size(0), heads = q.size(1), tokens = q.size(2);
  if (q.size(3) % 2 != 0 || tokens > kMaxTokens || tokens < 1 || k.sizes() != q.sizes() ||
      v.size(0) != batch || v.size(1) != heads || v.size(2) != tokens)
    return std::nullopt;
  HeadShape hs;
  hs.tokens = tokens;
  hs.qk_width = q.size(3);
  hs.v_width = v.size(3);
  hs.keys_padded = round_up(tokens, kLanes);
  hs.key_pairs = (tokens + 1) / 2;
  hs.width_padded = round_up(hs.v_width, kLanes);
  // fp32 key bias rows, one per batch entry (the mask broadcasts over heads and queries)
  std::optional<at::Tensor> bias;
  if (mask.has_value()) {
    bias = at::zeros({batch, hs.keys_padded}, mask->options().dtype(at::kFloat));
    bias->narrow(1, 0, tokens).copy_(mask->reshape({batch, tokens}));
  }
  at::Tensor out = at::empty({batch, heads, tokens, hs.v_width}, q.options());
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch(hs);
    for (int64_t index = begin; index < end; ++index) {
      const int64_t b = index / heads, h = index % heads;
      attend_head(qp + b * q.stride(0) + h * q.stride(1), q.stride(2),
                  kp + b * k.stride(0) + h * k.stride(1), k.stride(2),
                  vp + b * v.stride(0) + h * v.stride(1), v.stride(2),
                  bp ? bp + b * hs.keys_padded : nullptr, static_cast<float>(scale), hs, scratch,
                  op + index * tokens * hs.v_width);
    }
  });
  return out;
}

#else  // not x86-64 with GCC/Clang: ATen's kernel everywhere

bool cpu_attention_bf16_supported() { return false; }

CpuAttentionCore cpu_attention_bf16_core() { return CpuAttentionCore::kAten; }

std::optional<at::Tensor> cpu_attention_bf16(const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, const std::optional<at::Tensor>&,
                                             double) {
  return std::nullopt;
}

#endif

namespace {

// One token's q and k heads (see cpu_rope_); `wide` holds one head in W.
template <typename T, typename W>
void rotate_row(T* row, at::IntArrayRef qk_dims, int64_t qk_total, const W* cos, const W* sin,
                W* wide) {
  for (int64_t part = 0; part < 2; ++part) {
    T* t = row + part * qk_total;
    int64_t offset = 0;
    for (const int64_t width : qk_dims) {
      const int64_t half = width / 2;
      T* head = t + offset;
      const W* c = cos + offset;
      const W* s = sin + offset;
      for (int64_t j = 0; j < width; ++j) wide[j] = static_cast<W>(head[j]);
      for (int64_t j = 0; j < half; ++j) head[j] = static_cast<T>(wide[j] * c[j] - wide[j + half] * s[j]);
      for (int64_t j = half; j < width; ++j)
        head[j] = static_cast<T>(wide[j] * c[j] + wide[j - half] * s[j]);
      offset += width;
    }
  }
}

}  // namespace

void cpu_rope_(at::Tensor& qkv, at::IntArrayRef qk_dims, const at::Tensor& cos,
               const at::Tensor& sin, const std::optional<at::Tensor>& index) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.stride(2) == 1 && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.scalar_type() == sin.scalar_type(),
              "cpu_rope_: qkv needs unit stride in its last dimension, the tables one layout");
  const int64_t batch = qkv.size(0), tokens = qkv.size(1), qk_total = cos.size(1);
  int64_t widest = 0;
  for (const int64_t width : qk_dims) widest = std::max(widest, width);
  const at::Tensor rows = index.has_value() ? index->to(at::kLong).contiguous() : at::Tensor();
  const int64_t* row_of = rows.defined() ? rows.data_ptr<int64_t>() : nullptr;
  const int64_t stride_b = qkv.stride(0), stride_n = qkv.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "cpu_rope_", [&] {
    using T = scalar_t;
    T* base = qkv.data_ptr<T>();
    auto run = [&](auto* cos_table, auto* sin_table) {
      using W = std::remove_const_t<std::remove_pointer_t<decltype(cos_table)>>;
      at::parallel_for(0, batch * tokens, 16, [&](int64_t begin, int64_t end) {
        std::vector<W> wide(widest);
        for (int64_t i = begin; i < end; ++i) {
          const int64_t b = i / tokens, n = i % tokens;
          const int64_t r = row_of ? row_of[i] : n;
          rotate_row<T, W>(base + b * stride_b + n * stride_n, qk_dims, qk_total,
                           cos_table + r * qk_total, sin_table + r * qk_total, wide.data());
        }
      });
    };
    if (cos.scalar_type() == at::kDouble) {
      run(cos.data_ptr<double>(), sin.data_ptr<double>());
    } else {
      run(cos.data_ptr<float>(), sin.data_ptr<float>());
    }
  });
}

}  // namespace dcvit
