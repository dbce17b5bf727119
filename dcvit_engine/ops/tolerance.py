"""How close a backend must come to the float64 reference (the op tests and `dcvit doctor`).

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
    return ((out.double().cpu() - ref.double().cpu()).norm() / ref.double().cpu().norm()).item()


def error_budget(torch_same_precision: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype,
                 *, interpreter_bf16: bool = False) -> float:
    """The largest relative error allowed in `dtype`, from plain PyTorch's own error there."""
    factor = INTERPRETER_BF16_FACTOR if interpreter_bf16 else FACTOR
    return factor * rel_err(torch_same_precision, ref64) + FLOOR[dtype]
