// LayerNorm over the last dimension for the cpu backend's attention and MLP blocks, one pass
// per row with AVX-512: the row's mean, its variance about the mean, then
// (x - mean) / sqrt(var + eps) * weight + bias, all in fp32 and rounded once to x's dtype (as
// ATen's kernel computes it). Why: ATen's bf16 LayerNorm took ~0.16 ms per DeiT-S batch-8
// call on a 2-core AMX Xeon where OpenVINO's MVN takes ~0.1 (benchmarks/RESULTS.md, "Where the
// time goes"), and below its grain size this kernel stays on the calling thread, so a
// batch-1 LayerNorm meets no thread barrier.
#pragma once
#include <ATen/ATen.h>

namespace dcvit {

// at::layer_norm(x, {D}, weight, bias, eps) for x (..., D) with weight and bias (D) of x's
// dtype: this kernel for contiguous fp32 or bf16 x on CPUs with AVX512-BF16 (the instructions
// cpu_attention_bf16_supported checks), ATen's kernel otherwise or where the environment
// variable DCVIT_CPU_LAYER_NORM=aten pins it (the tests check both).
at::Tensor cpu_layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                          double eps);

}  // namespace dcvit
