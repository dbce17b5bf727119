"""Weights files of timm models: read them safely, and load them with errors a user can act on.

Accepted: a timm state dict saved as .pth / .pt / .bin (read with torch.load(weights_only=
True), so no pickled code runs) or .safetensors, possibly wrapped under "model" or
"state_dict" (as training scripts save it) and with DDP / torch.compile name prefixes.
A file that cannot be read, or whose tensors do not fit the model, raises a one-line
ValueError naming the file and the offending tensors.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from dcvit_engine.errors import InputError

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
WRAPPER_KEYS = ("model", "state_dict")
NAME_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
MAX_LISTED = 3  # tensors named per kind of problem; the rest are counted


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _read(path: Path):
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # safetensors has its own error types for bad headers/data
            raise InputError(f"checkpoint {path} is not a readable safetensors file "
                             f"({_first_line(err)}); is it corrupt or truncated?") from None
    if suffix not in TORCH_SUFFIXES:
        raise InputError(f"checkpoint {path} has an unknown suffix {path.suffix!r}; expected a state "
                         f"dict file ending in {', '.join(TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,))}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling, zip, OS and EOF errors all mean: not a usable file
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if refused:
            raise InputError(f"checkpoint {path} holds a Python object ({refused.group(1)}) besides "
                             "tensors, which torch.load(weights_only=True) refuses to unpickle; "
                             "save only the state dict (torch.save(model.state_dict(), ...))") from None
        raise InputError(f"checkpoint {path} is not a readable PyTorch file (torch.load failed: "
                         f"{type(err).__name__}); is it corrupt or truncated?") from None


def _strip_prefixes(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in NAME_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a timm checkpoint file, unwrapped and with timm's names."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found (expected a .pth/.pt/.safetensors "
                                "state dict of the timm model)")
    data = _read(path)
    if isinstance(data, dict):
        for key in WRAPPER_KEYS:
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not data or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise InputError(f"checkpoint {path} is not a state dict (a mapping of tensor names to tensors, "
                         f"possibly under {' or '.join(repr(k) for k in WRAPPER_KEYS)})")
    return {_strip_prefixes(name): tensor for name, tensor in data.items()}


def state_dict_problems(expected: dict[str, tuple], state: dict[str, torch.Tensor]) -> list[str]:
    """What keeps `state` from loading into a model whose tensors have `expected` shapes:
    one phrase per kind (other shapes, missing, unexpected), naming the first tensors."""
    def phrase(kind: str, items: list[str]) -> list[str]:
        if not items:
            return []
        more = f"; and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
        return [f"{len(items)} {kind} ({'; '.join(items[:MAX_LISTED])}{more})"]

    reshaped = [f"{n} is {tuple(state[n].shape)}, the model needs {tuple(expected[n])}"
                for n in sorted(set(expected) & set(state)) if tuple(state[n].shape) != tuple(expected[n])]
    return (phrase("with other shapes", reshaped)
            + phrase("missing", sorted(set(expected) - set(state)))
            + phrase("unexpected", sorted(set(state) - set(expected))))


def load_checkpoint(model: nn.Module, path: str | os.PathLike, what: str = "the model") -> nn.Module:
    """Load a timm checkpoint file into `model` (a timm ViT or an uncompressed ViTReference,
    which share tensor names) in place; returns the model."""
    state = read_state_dict(path)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    problems = state_dict_problems(expected, state)
    if problems:
        raise InputError(f"checkpoint {path} does not fit {what}: tensors {', '.join(problems)}; "
                         "is it a checkpoint of another model, or of other --model-kwargs?")
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    return model
