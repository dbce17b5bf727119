"""Argument checks every op makes: each tensor's shape, and that it shares x's dtype and
device. Each error is one line naming the argument and what to do."""


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
