"""The fused MLP-only block, y = x + gamma * fc2(GELU(fc1(LayerNorm(x)))).

This is what DC-ViT leaves where it removes a block's attention. Backends: torch
(kernels.mlp_block.mlp_block_ref), cpu and cuda (torch.ops.dcvit.mlp_block from
dcvit_engine._C), triton (torch.ops.dcvit.mlp_block_triton, a torch.library.triton_op).
"""
import torch

from dcvit_engine import _native
from dcvit_engine.kernels.fused_linear import FoldedNorm
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


def check_folded(folded: FoldedNorm, weight, x, name="fc1_folded"):
    """Raises ValueError unless `folded` matches `weight` (N, D) and x's device."""
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


def _mlp_block_fake(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                    gamma, eps, fc1_folded_weight=None, fc1_folded_bias=None, fc1_weight_sums=None):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@triton_kernel_op("dcvit::mlp_block_triton", fake=_mlp_block_fake)
def _mlp_block_triton_op(
    x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
    fc1_weight: torch.Tensor, fc1_bias: torch.Tensor, fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor, gamma: torch.Tensor | None, eps: float,
    fc1_folded_weight: torch.Tensor | None = None, fc1_folded_bias: torch.Tensor | None = None,
    fc1_weight_sums: torch.Tensor | None = None,
) -> torch.Tensor:
    # the three fc1_folded tensors: fold_layer_norm's result, all or none (see mlp_block)
    folded = None if fc1_folded_weight is None else \
        FoldedNorm(fc1_folded_weight, fc1_folded_bias, fc1_weight_sums)
    return mlp_block_triton(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                            gamma=gamma, eps=eps, kernel_launcher=KERNEL_LAUNCHER, fc1_folded=folded)


if _native.LOAD_ERROR is None:
    torch.library.register_fake("dcvit::mlp_block")(_mlp_block_fake)

# Resolve the compiled kernels' availability now, outside any torch.compile trace.
_native.native_unavailable(OP, "CPU")
_native.native_unavailable(OP, "CUDA")


# Every impl gets (x, 6 weights, gamma, eps, fc1_folded); only Triton uses fc1_folded.
def _run_torch(*args):
    *tensors, gamma, eps, _ = args
    return mlp_block_ref(*tensors, gamma=gamma, eps=eps)


def _run_native(*args):
    return torch.ops.dcvit.mlp_block(*args[:-1])


def _run_triton(*args):
    *rest, folded = args
    return torch.ops.dcvit.mlp_block_triton(*rest, *(folded if folded is not None else ()))


# Backend order: dispatch.PRIORITY["mlp_block"].
_DISPATCH = OpDispatcher(OP, standard_impls(OP, _run_torch, _run_native, _run_triton, gemm=True))


def mlp_block(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *,
              eps=1e-6, gamma=None, backend=None, fc1_folded: FoldedNorm | None = None):
    """x + gamma * fc2(GELU(fc1(LayerNorm(x)))) for x (..., D), fc1 (H, D), fc2 (D, H).

    gamma is LayerScale (D,) or None. `backend` in {torch, cpu, cuda, triton} forces one
    implementation (else DCVIT_BACKEND, else the device's priority list). `fc1_folded`:
    kernels.fused_linear.fold_layer_norm(norm_weight, norm_bias, fc1_weight, fc1_bias), made
    once (the engine does at build time) for the Triton impl; without it Triton folds per call.
    """
    check_mlp_block_args(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma)
    if fc1_folded is not None:
        check_folded(fc1_folded, fc1_weight, x)
    args = (x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, float(eps),
            fc1_folded)
    return _DISPATCH(x.device, *args, backend=backend)


def mlp_block_backends(x, *weights, gamma=None, eps=1e-6) -> dict[str, str | None]:
    """Each backend's reason for refusing these inputs (None: available)."""
    return _DISPATCH.reasons(x, *weights, gamma, float(eps), None)
