"""The one rule for choosing the device to compute on, so every command and method picks the
same: the one asked for, else CUDA when available, else the CPU; asking for CUDA on a machine
without it is a one-line error."""
from __future__ import annotations

import torch

from dcvit_engine.errors import InputError, NoDeviceError


def resolve_device(device=None) -> torch.device:
    """`device` (a string or torch.device) as a torch.device; None: CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:  # torch's parse error for a name it does not know
        raise InputError(f"unknown device {str(device)!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NoDeviceError(f"device {device} was asked for but CUDA is not available here; use the CPU "
                         "(--device cpu, device='cpu')")
    return device
