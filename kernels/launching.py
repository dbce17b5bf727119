"""What every Triton launcher shares: the default kernel launcher and tl.dot's settings.

A launcher takes `launch=`, a function applied to each kernel before `kernel[grid](...)`:
`wrap_triton` inside the registered op (so torch.compile sees the kernels), a recorder in
benchmarks/codegen_report.py, or `launch_directly` (the default).
"""
import torch


def launch_directly(kernel):
    return kernel


def dot_precision(dtype):
    # fp32 inputs get true fp32 products (as torch's default matmul, and merge choices
    # that match the fp32 reference), not TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


def dot_upcast(device_type, dtype):
    # The CPU interpreter computes tl.dot on bf16 operands wrongly (numpy has no bf16). A
    # product of two bf16 or fp16 values is exact in fp32, so upcasting the operands gives
    # what the GPU's MMA computes, up to summation order (for fp16 numpy multiplies in fp32
    # either way: the upcast changes nothing there, and keeps one rule for both halves).
    return device_type == "cpu" and dtype in (torch.bfloat16, torch.float16)
