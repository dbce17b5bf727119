// The attention core softmax(scale * q k^T + key_bias) v in bf16 on CPUs with AVX512-BF16,
// for the cpu backend's attention_block. Why: ATen's CPU flash-attention kernel runs its
// block products through ATen's own bf16 GEMM where the CPU has no AMX (about 60 GFLOP/s per
// core on this project's AMD CPU, against 330-455 for oneDNN's bf16 GEMMs), which made the
// attention core about a third of a DeiT-S forward. This kernel computes, per (batch, head),
// the scores in fp32 from bf16 products (vdpbf16ps), the softmax in fp32, and P V with P's
// unnormalized exponentials rounded to bf16 and the 1 / sum applied to the fp32 result:
// the same roundings as ATen's flash kernel, so the same error.
#pragma once
#include <ATen/ATen.h>
#include <optional>

namespace dcvit {

// Whether this CPU has the instructions (AVX512-F/BW/VL/DQ and AVX512-BF16).
bool cpu_attention_bf16_supported();

// softmax(scale * q k^T + mask) v for bf16 q (B, H, N, Dq), k (B, H, N, Dq), v (B, H, N, Dv):
// views with unit stride in the last dimension (e.g. heads sliced out of a qkv tensor);
// mask (B, 1, 1, N) or none, any float dtype. Returns (B, H, N, Dv) contiguous bf16, or
// nullopt where the kernel does not apply (CPU without AVX512-BF16, another dtype, an odd
// Dq, N above kMaxTokens); the caller then runs at::scaled_dot_product_attention.
std::optional<at::Tensor> cpu_attention_bf16(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v,
                                             const std::optional<at::Tensor>& mask, double scale);

}  // namespace dcvit
