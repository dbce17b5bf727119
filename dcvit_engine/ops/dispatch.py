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
from dcvit_engine.errors import InputError, UserError

BACKENDS = ("torch", "cpu", "cuda", "triton")
ENV_VAR = "DCVIT_BACKEND"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Backend order per op and device: the one place it is written (`dcvit doctor` prints it).
# On the CPU the compiled kernels come first and the CPU interpreter (Triton on CPU tensors,
# TRITON_INTERPRET=1) is never picked on its own. Until a GPU has timed the ops
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
# - token merges: the compiled CUDA kernels first; not yet measured against Triton.
# A GPU measurement replaces these rows (bench_mlp_block / bench_attention / bench_token_merge).
# An op without a row here gets default_priority over the backends it declares.
_CPU_ORDER = ("cpu", "torch")
PRIORITY = {
    "mlp_block": {"cuda": ("triton", "cuda", "torch"), "cpu": _CPU_ORDER},
    "attention_block": {"cuda": ("triton", "cuda", "torch"), "cpu": _CPU_ORDER},
    "attention_block_key_mean": {"cuda": ("triton", "cuda", "torch"), "cpu": _CPU_ORDER},  # as the block
    "tome_merge": {"cuda": ("cuda", "triton", "torch"), "cpu": _CPU_ORDER},
    "atme_merge": {"cuda": ("cuda", "triton", "torch"), "cpu": _CPU_ORDER},
    "atme_unmerge": {"cuda": ("cuda", "triton", "torch"), "cpu": _CPU_ORDER},
}
# Devices other than these run the torch reference only.
OTHER_DEVICE_ORDER = ("torch",)
# The order of an op that has no measured row: compiled kernels, then Triton, then torch.
_DEFAULT_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": _CPU_ORDER}


def default_priority(op: str, backends: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The op's PRIORITY row, else the default order over the backends it declares."""
    if op in PRIORITY:
        return PRIORITY[op]
    return {device: tuple(b for b in order if b in backends) for device, order in _DEFAULT_ORDER.items()}


class BackendUnavailableError(UserError, RuntimeError):
    """A requested backend cannot run the given inputs; the message lists each reason."""


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of an op: `why_not(*args, **options)` returns None when
    it can run these inputs, else a short reason; `run(*args, **options)` computes the result."""

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
        raise InputError(f"{source}{name!r} is not a backend; choose one of {BACKENDS} or 'auto'")
    return name


def describe_value(value) -> str:
    """A short description of one input: shape, dtype and device of a tensor, else its repr."""
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).replace("torch.", "")
        return f"{tuple(value.shape)} {dtype} on {value.device}"
    if isinstance(value, tuple) and value and all(isinstance(v, torch.Tensor) for v in value):
        return "(" + ", ".join(describe_value(v) for v in value) + ")"
    return repr(value)


class OpDispatcher:
    """Chooses and runs one op's implementation; see the module docstring. `arg_names` (the
    schema's) name the inputs in a refusal."""

    def __init__(self, op: str, impls: Sequence[Impl], priority: dict | None = None,
                 arg_names: Sequence[str] = ()):
        # `priority` overrides the PRIORITY table (tests, ops without a row there)
        self.op = op
        self.impls = {impl.backend: impl for impl in impls}
        self.priority = priority if priority is not None else default_priority(op, list(self.impls))
        self.arg_names = list(arg_names)

    def order(self, device_type: str) -> tuple[str, ...]:
        return self.priority.get(device_type, OTHER_DEVICE_ORDER)

    def reasons(self, *args, **options) -> dict[str, str | None]:
        """Every backend's reason for refusing these inputs (None: it can run them)."""
        return {name: impl.why_not(*args, **options) for name, impl in self.impls.items()}

    def choose(self, device: torch.device, *args, backend: str | None = None, **options) -> Impl:
        wanted = requested_backend(backend)
        if wanted is not None:
            impl = self.impls.get(wanted)
            reason = impl.why_not(*args, **options) if impl else f"{self.op} has no {wanted} implementation"
            if reason is None:
                return impl
            raise BackendUnavailableError(self._refusal(f"backend {wanted!r} was requested", args, options))
        for name in self.order(device.type):
            impl = self.impls.get(name)
            if impl is not None and impl.why_not(*args, **options) is None:
                return impl
        raise BackendUnavailableError(self._refusal(f"no backend can run it on {device}", args, options))

    def __call__(self, device: torch.device, *args, backend: str | None = None, **options):
        return self.choose(device, *args, backend=backend, **options).run(*args, **options)

    def describe_inputs(self, args, options) -> str:
        """One line per given input: its name (from the schema) and what it is."""
        names = self.arg_names + [f"arg{i}" for i in range(len(self.arg_names), len(args))]
        given = list(zip(names, args)) + [(k, v) for k, v in options.items() if v is not None]
        return "\n".join(f"  {name}: {describe_value(value)}" for name, value in given)

    def _refusal(self, headline: str, args, options) -> str:
        lines = [f"{self.op}: {headline}, but:"]
        for name, reason in self.reasons(*args, **options).items():
            lines.append(f"  {name}: {reason or 'available'}")
        lines.append("for the inputs")
        lines.append(self.describe_inputs(args, options))
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


_NATIVE_KEYS = {"cpu": ("CPU", "the CPU"), "cuda": ("CUDA", "a CUDA device")}


def native_why_not(op: str, device_type: str, tensors: Sequence[torch.Tensor],
                   dtypes=FLOAT_DTYPES) -> str | None:
    """Why the compiled `device_type` ('cpu'/'cuda') kernel of `op` cannot take the inputs."""
    key, where = _NATIVE_KEYS[device_type]
    device = tensors[0].device
    if device.type != device_type:
        return f"inputs are on {device}, not {where}"
    if tensors[0].dtype not in dtypes:
        return f"dtype {tensors[0].dtype} not supported"
    return native_unavailable(op, key)


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
