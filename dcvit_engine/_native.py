"""Loads the compiled op library `dcvit_engine._C` once.

If it cannot be loaded (not built, built against another torch, missing CUDA libraries),
a warning says why and the `torch` and `triton` backends keep working; the dispatcher
reports the same reason for the `cpu` and `cuda` backends.
"""
import warnings

import torch

LOAD_ERROR: str | None = None
try:
    from dcvit_engine import _C  # noqa: F401  (loading registers torch.ops.dcvit.*)
except Exception as exc:  # ImportError, OSError (undefined symbol from an ABI mismatch), ...
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"dcvit_engine._C could not be loaded ({LOAD_ERROR}); the compiled cpu/cuda backends "
        "are off and the torch/triton backends still work. Rebuild against the installed torch "
        "with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )


_AVAILABILITY: dict[tuple[str, str], str | None] = {}


def compiled_cuda_archs() -> list[str] | None:
    """The CUDA archs _C's kernels were compiled for (e.g. ['sm_80', 'sm_90']), [] when it was
    built without CUDA, None when _C is not loaded or predates this record."""
    if LOAD_ERROR is not None or not hasattr(_C, "cuda_archs"):
        return None
    return [f"sm_{arch}" for arch in _C.cuda_archs.split("_") if arch]


def native_unavailable(op: str, dispatch_key: str) -> str | None:
    """Why the compiled kernel of `dcvit::op` for `dispatch_key` ('CPU'/'CUDA') cannot run,
    or None when it can. Memoized: registrations are fixed once _C is loaded, and a plain
    dict lookup keeps the dispatcher traceable by torch.compile."""
    key = (op, dispatch_key)
    if key not in _AVAILABILITY:
        _AVAILABILITY[key] = _query_native(op, dispatch_key)
    return _AVAILABILITY[key]


def _query_native(op: str, dispatch_key: str) -> str | None:
    if LOAD_ERROR is not None:
        return f"dcvit_engine._C not loaded ({LOAD_ERROR})"
    if not hasattr(torch.ops.dcvit, op):
        return (f"dcvit_engine._C has no {op} op (built from older sources); rebuild with "
                "`pip install --no-build-isolation -e .`")
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"dcvit::{op}", dispatch_key):
        if dispatch_key == "CUDA":
            return "dcvit_engine._C was built without CUDA kernels (no CUDA toolkit, or DCVIT_BUILD_CUDA=0)"
        return f"dcvit_engine._C has no {dispatch_key} kernel for {op}"
    return None
