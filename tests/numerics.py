"""Tolerances shared by the op tests.

A fused kernel's error against a float64 reference may be at most FACTOR times the error
of PyTorch's own computation in the same precision (flash-attention's convention), plus a
floor for fp32 where both are at rounding level.
"""
import torch

FACTOR = 2.0
# The Triton CPU interpreter truncates fp32 -> bf16 instead of rounding to nearest (seen
# with triton 3.9: twice the rounding error), so interpreter bf16 gets twice the factor.
INTERPRETER_BF16_FACTOR = 4.0
FLOOR = {torch.float32: 2e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def assert_close_to_reference(out, ref64, torch_same_precision, *, interpreter_bf16=False, what=""):
    """out: the kernel's result; ref64: float64 reference; torch_same_precision: plain
    PyTorch's result in out's dtype (its error sets the budget)."""
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten or overflowed output)"
    factor = INTERPRETER_BF16_FACTOR if interpreter_bf16 else FACTOR
    budget = factor * rel_err(torch_same_precision, ref64) + FLOOR[out.dtype]
    err = rel_err(out, ref64)
    assert err <= budget, f"{what}: relative error {err:.3e} > budget {budget:.3e}"


def poisoned_like(x: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN: any element a kernel fails to write shows up."""
    return torch.full_like(x, float("nan"), memory_format=torch.contiguous_format)
