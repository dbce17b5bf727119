"""Argument checks the ops share: each tensor's shape and that it shares x's dtype and device,
a LayerNorm folded into a weight (the Triton impls' hint), an int that is not a bool. Each
error is one line naming the argument and what to do."""
import torch

from dcvit_engine.errors import is_int


def check_like_x(op: str, x, expected: dict) -> None:
    """`expected`: argument name -> (tensor or None, its shape or None for any). Raises
    ValueError for the first tensor of another shape, then of another dtype or device than x."""
    for name, (tensor, shape) in expected.items():
        if tensor is not None and shape is not None and tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
    for name, (tensor, _) in expected.items():
        if tensor is None:
            continue
        if tensor.dtype != x.dtype:
            raise ValueError(f"{op}: {name} is {tensor.dtype} but x is {x.dtype}; cast it to x's dtype")
        if tensor.device != x.device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but x is on {x.device}; move it there")


def check_folded(folded, weight, x, name="fc1_folded") -> None:
    """Raises ValueError unless `folded` (kernels.fused_linear.FoldedNorm) matches `weight`
    (N, D) and x's dtype and device."""
    width = weight.shape[0]
    if tuple(folded.weight.shape) != tuple(weight.shape) or folded.weight.dtype != x.dtype:
        raise ValueError(f"{name}.weight must be {x.dtype} of shape {tuple(weight.shape)}; "
                         "make it with fold_layer_norm from this block's weights")
    for part in ("bias", "sums"):
        t = getattr(folded, part)
        if tuple(t.shape) != (width,) or t.dtype != torch.float32:
            raise ValueError(f"{name}.{part} must be float32 of shape ({width},); "
                             "make it with fold_layer_norm")
    if any(t.device != x.device for t in folded):
        raise ValueError(f"{name} is not on {x.device}, where x is")


def check_int(op: str, name: str, value, minimum: int) -> None:
    """Raises ValueError unless `value` is an int >= minimum (a bool is not one)."""
    if not is_int(value) or value < minimum:
        raise ValueError(f"{op}: {name} must be an int >= {minimum}, got {value!r}")
