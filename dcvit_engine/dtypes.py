"""The one home of dtype names and choices: the name table ('bf16', 'float16', ...), parsing a
name or a torch.dtype, the short names every table and file uses, and the default run dtype
(the engine's, the commands', the benchmarks' and the kernels' checks per device)."""
from __future__ import annotations

import torch

from .errors import InputError

# the short names: what command lines, CSV rows, exports and reports write
SHORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# every name parse_dtype reads
DTYPES = {**SHORT_DTYPES, "float32": torch.float32, "float16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16, "float64": torch.float64}
# the dtype a kernel check, benchmark or `dcvit doctor` runs on a device when none is asked for:
# bf16 on CUDA (tensor cores; the Triton GEMMs refuse fp32 there), fp32 elsewhere
DEVICE_DEFAULTS = {"cuda": "bf16", "cpu": "fp32"}


def parse_dtype(dtype) -> torch.dtype:
    """torch.dtype from a dtype or a name such as 'bf16' / 'float16'."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise InputError(f"dtype must be a floating-point type, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise InputError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")


def short_name(dtype: torch.dtype) -> str | None:
    """'fp32' / 'fp16' / 'bf16' for those dtypes, else None."""
    return next((name for name, d in SHORT_DTYPES.items() if d == dtype), None)


def device_default(device_type: str) -> str:
    """The short name of the dtype a device runs when none is asked for (DEVICE_DEFAULTS)."""
    return DEVICE_DEFAULTS.get(device_type, "fp32")


def default_dtype(model_dtype: torch.dtype, device: torch.device) -> tuple[torch.dtype, str | None]:
    """build_engine's run dtype when none is given, and the note saying so (None: the model's
    dtype). On CUDA: bf16, since fp32 keeps the Triton GEMMs (refused) and tensor cores out."""
    if device.type == "cuda" and model_dtype == torch.float32:
        return torch.bfloat16, ("build_engine: running in bfloat16, the default on CUDA; pass "
                                "dtype=torch.float32 (CLI: --dtype fp32) for fp32")
    return model_dtype, None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16, Linux
    /proc/cpuinfo flags), where oneDNN runs bf16 linears about twice as fast as fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def command_dtype(requested: str | None, device: torch.device) -> tuple[torch.dtype, str | None]:
    """The CLI's run dtype (`dcvit bench` / `dcvit infer`) and the note saying why when it
    was not requested: bf16 on CUDA and on CPUs with native bf16, else fp32."""
    if requested is not None:
        return parse_dtype(requested), None
    if device.type == "cuda":
        return torch.bfloat16, None
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16, ("running in bfloat16, the default on this CPU (it has native bf16 "
                                "instructions); pass --dtype fp32 for fp32")
    return torch.float32, None
