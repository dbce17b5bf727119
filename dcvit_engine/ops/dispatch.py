"""Backend dispatch shared by every op.

Each op has one implementation per backend:
  torch   the plain-PyTorch reference (any device, any float dtype)
  cpu     the C++ kernel from dcvit_engine._C
  cuda    the CUDA kernel from dcvit_engine._C
  triton  the Triton kernel (GPU; on the CPU only under TRITON_INTERPRET=1, for testing)

A backend says *why* it cannot take an input (device, dtype, shape, not built). Without a
request the first backend of the device's priority list that can take the input runs. A
request -- the `backend=` argument, else the DCVIT_BACKEND environment variable -- is
honoured or refused with every backend's reason; it is never silently replaced.
"""
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from dcvit_engine._native import native_unavailable

BACKENDS = ("torch", "cpu", "cuda", "triton")
ENV_VAR = "DCVIT_BACKEND"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The CPU interpreter runs Triton kernels for testing only; it is never picked on its own.
DEFAULT_PRIORITY = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}

# Backend order per op: the one place it is written. Until a GPU has timed the ops
# (benchmarks/RESULTS.md), the GPU order follows the sm_90 code-generation report:
# - mlp_block: Triton first. With LayerNorm folded out of fc1's K loop both GEMMs are plain
#   shared-memory GEMMs with their epilogues fused (row statistics, bias, GELU, LayerScale,
#   residual), while the cuda impl adds a LayerNorm pass, a GELU pass over the (rows, H)
#   hidden activations and a residual pass around cuBLAS.
# - attention_block: Triton first. On every head layout the engine builds (heads padded to
#   multiples of 16) its flash kernel compiles without spills, with 16-byte cp.async loads and
#   361-466 instructions per key block (target <= 500), and its qkv GEMM has LayerNorm folded
#   out of the K loop; the cuda impl runs extra LayerNorm and residual passes around cuBLAS
#   and SDPA. fp32 on CUDA is refused by Triton and goes to the cuda impl.
# - token merges: the compiled kernels first (default order).
# A GPU measurement replaces these rows (bench_mlp_block / bench_attention / bench_token_merge).
PRIORITY = {
    "mlp_block": {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")},
    "attention_block": {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")},
    "tome_merge": DEFAULT_PRIORITY,
    "atme_merge": DEFAULT_PRIORITY,
    "atme_unmerge": DEFAULT_PRIORITY,
}


class BackendUnavailableError(RuntimeError):
    """A requested backend cannot run the given inputs; the message lists each reason."""


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of an op: `why_not(*args)` returns None when it can
    run these inputs, else a short reason; `run(*args)` computes the result."""

    backend: str
    why_not: Callable[..., str | None]
    run: Callable[..., torch.Tensor]


def requested_backend(backend: str | None) -> str | None:
    """The explicit request: the argument, else DCVIT_BACKEND; None or 'auto' means choose."""
    name = backend if backend is not None else os.environ.get(ENV_VAR)
    if name is None or name == "auto":
        return None
    if name not in BACKENDS:
        source = "backend=" if backend is not None else f"{ENV_VAR}="
        raise ValueError(f"{source}{name!r} is not a backend; choose one of {BACKENDS} or 'auto'")
    return name


class OpDispatcher:
    """Chooses and runs one op's implementation; see the module docstring."""

    def __init__(self, op: str, impls: Sequence[Impl], priority: dict | None = None):
        # `priority` overrides the PRIORITY table (tests); ops take their row from the table
        self.op = op
        self.impls = {impl.backend: impl for impl in impls}
        self.priority = priority or PRIORITY.get(op, DEFAULT_PRIORITY)

    def reasons(self, *args) -> dict[str, str | None]:
        """Every backend's reason for refusing these inputs (None: it can run them)."""
        return {name: impl.why_not(*args) for name, impl in self.impls.items()}

    def choose(self, device: torch.device, *args, backend: str | None = None) -> Impl:
        wanted = requested_backend(backend)
        if wanted is not None:
            impl = self.impls.get(wanted)
            reason = impl.why_not(*args) if impl else f"{self.op} has no {wanted} implementation"
            if reason is None:
                return impl
            raise BackendUnavailableError(self._refusal(f"backend {wanted!r} was requested", args))
        for name in self.priority.get(device.type, ("torch",)):
            impl = self.impls.get(name)
            if impl is not None and impl.why_not(*args) is None:
                return impl
        raise BackendUnavailableError(self._refusal(f"no backend can run it on {device}", args))

    def __call__(self, device: torch.device, *args, backend: str | None = None):
        return self.choose(device, *args, backend=backend).run(*args)

    def _refusal(self, headline: str, args) -> str:
        lines = [f"{self.op}: {headline}, but:"]
        for name, reason in self.reasons(*args).items():
            lines.append(f"  {name}: {reason or 'available'}")
        lines.append(f"Pass backend=... or set {ENV_VAR} to an available backend.")
        return "\n".join(lines)


# Reasons shared by the ops' backends ------------------------------------------------------

def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton not importable ({exc})"
    return None


_TRITON_IMPORT_ERROR = _triton_import_error()


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cpu_native_why_not(op: str, tensors: Sequence[torch.Tensor], dtypes=FLOAT_DTYPES) -> str | None:
    device = tensors[0].device
    if device.type != "cpu":
        return f"inputs are on {device}, not the CPU"
    if tensors[0].dtype not in dtypes:
        return f"dtype {tensors[0].dtype} not supported"
    return native_unavailable(op, "CPU")


def cuda_native_why_not(op: str, tensors: Sequence[torch.Tensor], dtypes=FLOAT_DTYPES) -> str | None:
    device = tensors[0].device
    if device.type != "cuda":
        return f"inputs are on {device}, not a CUDA device"
    if tensors[0].dtype not in dtypes:
        return f"dtype {tensors[0].dtype} not supported"
    return native_unavailable(op, "CUDA")


def triton_why_not(tensors: Sequence[torch.Tensor], dtypes=FLOAT_DTYPES) -> str | None:
    if _TRITON_IMPORT_ERROR is not None:
        return _TRITON_IMPORT_ERROR
    device = tensors[0].device
    if device.type == "cpu" and not triton_interpreting():
        return "CPU tensors need TRITON_INTERPRET=1 set before Python starts (testing only)"
    if device.type not in ("cpu", "cuda"):
        return f"inputs are on {device}"
    if tensors[0].dtype not in dtypes:
        return f"dtype {tensors[0].dtype} not supported"
    return None


def triton_gemm_why_not(tensors: Sequence[torch.Tensor]) -> str | None:
    """triton_why_not for ops that run Triton GEMMs: fp32 on CUDA is refused, since an exact
    fp32 tl.dot compiles to FFMA (no tensor cores) with kilobytes of register spills."""
    reason = triton_why_not(tensors)
    if reason is None and tensors[0].device.type == "cuda" and tensors[0].dtype == torch.float32:
        return ("fp32 on CUDA: Triton GEMMs would run exact-fp32 dots without tensor cores; "
                "use bf16/fp16 or the cuda backend")
    return reason


def torch_why_not(tensors: Sequence[torch.Tensor]) -> str | None:
    if not tensors[0].is_floating_point():
        return f"dtype {tensors[0].dtype} is not a floating-point type"
    return None


def standard_impls(op: str, run_torch, run_native, run_triton, *, gemm: bool = False) -> list[Impl]:
    """The four backends of an op whose first argument is its main input tensor: the torch
    reference, the compiled kernels (torch.ops.dcvit.<op> on CPU and CUDA) and the Triton op,
    each refusing by the shared reasons above. `gemm`: the Triton op runs GEMMs, so it also
    refuses fp32 on CUDA (triton_gemm_why_not)."""
    triton_check = triton_gemm_why_not if gemm else triton_why_not
    return [
        Impl("torch", lambda x, *rest: torch_why_not([x]), run_torch),
        Impl("cpu", lambda x, *rest: cpu_native_why_not(op, [x]), run_native),
        Impl("cuda", lambda x, *rest: cuda_native_why_not(op, [x]), run_native),
        Impl("triton", lambda x, *rest: triton_check([x]), run_triton),
    ]
