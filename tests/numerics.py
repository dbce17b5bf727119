"""Tolerances shared by the op tests: the rule lives in dcvit_engine.ops.tolerance (which
`dcvit doctor` applies too); this module adds the assertion and the poisoned buffers."""
import torch

from dcvit_engine.ops.tolerance import FACTOR, FLOOR, INTERPRETER_BF16_FACTOR, error_budget, rel_err

__all__ = ["FACTOR", "FLOOR", "INTERPRETER_BF16_FACTOR", "rel_err", "assert_close_to_reference",
           "poisoned_like"]


def assert_close_to_reference(out, ref64, torch_same_precision, *, interpreter_bf16=False, what=""):
    """out: the kernel's result; ref64: float64 reference; torch_same_precision: plain
    PyTorch's result in out's dtype (its error sets the budget)."""
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten or overflowed output)"
    budget = error_budget(torch_same_precision, ref64, out.dtype, interpreter_bf16=interpreter_bf16)
    err = rel_err(out, ref64)
    assert err <= budget, f"{what}: relative error {err:.3e} > budget {budget:.3e}"


def poisoned_like(x: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN: any element a kernel fails to write shows up."""
    return torch.full_like(x, float("nan"), memory_format=torch.contiguous_format)
