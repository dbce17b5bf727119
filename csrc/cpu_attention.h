// The attention core softmax(scale * q k^T + key_bias) v in bf16 on CPUs with AVX512-BF16,
// for the cpu backend's attention_block. Why: ATen's CPU flash-attention kernel runs its
// block products through ATen's own bf16 GEMM where the CPU has no AMX (about 60 GFLOP/s per
// core on this project's AMD CPU, against 330-455 for oneDNN's bf16 GEMMs), which made the
// attention core about a third of a DeiT-S forward. This kernel computes, per (batch, head),
// the scores in fp32 from bf16 products (vdpbf16ps), the softmax in fp32, and P V with P's
// unnormalized exponentials rounded to bf16 and the 1 / sum applied to the fp32 result:
// the same roundings as ATen's flash kernel, so the same error.
// Where the CPU has AMX, ATen's flash kernel runs its block products as oneDNN brgemm on AMX
// tiles instead, and is the faster one (DeiT-S bf16 shapes, 2 threads, Xeon with AMX: about
// 4x this kernel's speed, see benchmarks/RESULTS.md); cpu_attention_bf16_core() picks by that.
#pragma once
#include <ATen/ATen.h>
#include <optional>

namespace dcvit {

// Whether this CPU has the instructions (AVX512-F/BW/VL/DQ and AVX512-BF16).
bool cpu_attention_bf16_supported();

// The bf16 attention core the cpu backend runs: this project's kernel (kOwn) where the CPU
// has AVX512-BF16 but ATen's brgemm has no AMX to run on (at::native::cpublas::could_pack,
// the test ATen's flash kernel makes itself), else ATen's SDPA (kAten). The environment
// variable DCVIT_CPU_ATTENTION=own or =aten pins one (own only where the CPU can run it), so
// the tests check both cores on one machine.
enum class CpuAttentionCore { kOwn, kAten };
CpuAttentionCore cpu_attention_bf16_core();

// softmax(scale * q k^T + mask) v for bf16 q (B, H, N, Dq), k (B, H, N, Dq), v (B, H, N, Dv):
// views with unit stride in the last dimension (e.g. heads sliced out of a qkv tensor);
// mask (B, 1, 1, N) or none, any float dtype. Returns (B, H, N, Dv) contiguous bf16, or
// nullopt where the kernel does not apply (cpu_attention_bf16_core() is not kOwn, another
// dtype, an odd Dq, N above kMaxTokens); the caller then runs at::scaled_dot_product_attention.
std::optional<at::Tensor> cpu_attention_bf16(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v,
                                             const std::optional<at::Tensor>& mask, double scale);

// RoPE on q and k in place: qkv (B, N, 2 * sum(qk_dims) + ...) with unit stride in its last
// dimension, q in columns [0, qk_total), k in [qk_total, 2 qk_total); each head's channels
// in the half layout, t * cos + rotate_half(t) * sin per token with the table row
// index[b, n] (or n without index), computed in the tables' precision (float32 or float64,
// (positions, qk_total) contiguous) and rounded once to qkv's dtype: what the generic path
// (attention.cpp) computes with eight ATen passes and a fp32 copy of q and k, in one pass.
void cpu_rope_(at::Tensor& qkv, at::IntArrayRef qk_dims, const at::Tensor& cos,
               const at::Tensor& sin, const std::optional<at::Tensor>& index);

}  // namespace dcvit
