"""The fused MLP-only block, y = x + gamma * fc2(GELU(fc1(LayerNorm(x)))).

This is what DC-ViT leaves where it removes a block's attention. Backends: torch
(kernels.mlp_block.mlp_block_ref), cpu and cuda (torch.ops.dcvit.mlp_block from
dcvit_engine._C), triton (torch.ops.dcvit.mlp_block_triton, a torch.library.triton_op).
"""
import torch

from dcvit_engine import _native
from dcvit_engine.kernels.mlp_block import mlp_block_ref, mlp_block_triton
from dcvit_engine.ops.dispatch import OpDispatcher, standard_impls
from dcvit_engine.ops.registration import KERNEL_LAUNCHER, triton_kernel_op

OP = "mlp_block"


def check_mlp_block_args(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                         gamma):
    """Raises ValueError naming the argument whose shape, dtype or device is off."""
    if x.dim() < 2:
        raise ValueError(f"mlp_block: x must be (..., D), got shape {tuple(x.shape)}")
    dim = x.shape[-1]
    if fc1_weight.dim() != 2 or fc1_weight.shape[1] != dim or fc1_weight.shape[0] < 1:
        raise ValueError(f"mlp_block: fc1_weight must be (H >= 1, D={dim}), got {tuple(fc1_weight.shape)}")
    hidden = fc1_weight.shape[0]
    expected = {
        "norm_weight": (norm_weight, (dim,)),
        "norm_bias": (norm_bias, (dim,)),
        "fc1_bias": (fc1_bias, (hidden,)),
        "fc2_weight": (fc2_weight, (dim, hidden)),
        "fc2_bias": (fc2_bias, (dim,)),
        "gamma": (gamma, (dim,)),
    }
    for name, (tensor, shape) in expected.items():
        if tensor is None:
            continue
        if tuple(tensor.shape) != shape:
            raise ValueError(f"mlp_block: {name} must have shape {shape}, got {tuple(tensor.shape)}")
    for name, tensor in [("fc1_weight", fc1_weight)] + [(n, t) for n, (t, _) in expected.items()]:
        if tensor is None:
            continue
        if tensor.dtype != x.dtype:
            raise ValueError(f"mlp_block: {name} is {tensor.dtype} but x is {x.dtype}; cast all to one dtype")
        if tensor.device != x.device:
            raise ValueError(f"mlp_block: {name} is on {tensor.device} but x is on {x.device}")
    if not x.is_floating_point():
        raise ValueError(f"mlp_block: x must be a floating-point tensor, got {x.dtype}")


def _mlp_block_fake(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                    gamma, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@triton_kernel_op("dcvit::mlp_block_triton", fake=_mlp_block_fake)
def _mlp_block_triton_op(
    x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
    fc1_weight: torch.Tensor, fc1_bias: torch.Tensor, fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor, gamma: torch.Tensor | None, eps: float,
) -> torch.Tensor:
    return mlp_block_triton(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                            gamma=gamma, eps=eps, kernel_launcher=KERNEL_LAUNCHER)


if _native.LOAD_ERROR is None:
    torch.library.register_fake("dcvit::mlp_block")(_mlp_block_fake)

# Resolve the compiled kernels' availability now, outside any torch.compile trace.
_native.native_unavailable(OP, "CPU")
_native.native_unavailable(OP, "CUDA")


def _run_torch(*args):
    *tensors, gamma, eps = args
    return mlp_block_ref(*tensors, gamma=gamma, eps=eps)


def _run_native(*args):
    return torch.ops.dcvit.mlp_block(*args)


def _run_triton(*args):
    return torch.ops.dcvit.mlp_block_triton(*args)


_DISPATCH = OpDispatcher(
    OP,
    standard_impls(OP, _run_torch, _run_native, _run_triton),
    # Triton first on the GPU: it fuses LayerNorm into fc1 and the residual into fc2, the
    # CUDA impl runs them as separate passes around cuBLAS. Expected, not yet timed on a
    # GPU: benchmarks/bench_mlp_block.py decides (benchmarks/RESULTS.md).
    priority={"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")},
)


def mlp_block(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *,
              eps=1e-6, gamma=None, backend=None):
    """x + gamma * fc2(GELU(fc1(LayerNorm(x)))) for x (..., D), fc1 (H, D), fc2 (D, H).

    gamma is LayerScale (D,) or None. `backend` in {torch, cpu, cuda, triton} forces one
    implementation (else DCVIT_BACKEND, else the device's priority list).
    """
    check_mlp_block_args(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma)
    args = (x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, float(eps))
    return _DISPATCH(x.device, *args, backend=backend)


def mlp_block_backends(x, *weights, gamma=None, eps=1e-6) -> dict[str, str | None]:
    """Each backend's reason for refusing these inputs (None: available)."""
    return _DISPATCH.reasons(x, *weights, gamma, float(eps))
