"""The fused MLP-only block, y = x + gamma * fc2(GELU(fc1(LayerNorm(x)))).

This is what DC-ViT leaves where it removes a block's attention. Backends: torch
(kernels.mlp_block.mlp_block_ref), cpu and cuda (torch.ops.dcvit.mlp_block from
dcvit_engine._C), triton (kernels.mlp_block.mlp_block_triton; see ops/define.py).
"""
import torch

from dcvit_engine.kernels.fused_linear import FoldedNorm
from dcvit_engine.kernels.mlp_block import mlp_block_ref, mlp_block_triton
from dcvit_engine.ops.checks import check_like_x
from dcvit_engine.ops.define import OpDef, define_op


def check_mlp_block_args(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                         gamma):
    """Raises ValueError naming the argument whose shape, dtype or device is off."""
    if x.dim() < 2:
        raise ValueError(f"mlp_block: x must be (..., D), got shape {tuple(x.shape)}")
    dim = x.shape[-1]
    if fc1_weight.dim() != 2 or fc1_weight.shape[1] != dim or fc1_weight.shape[0] < 1:
        raise ValueError(f"mlp_block: fc1_weight must be (H >= 1, D={dim}), got {tuple(fc1_weight.shape)}")
    hidden = fc1_weight.shape[0]
    check_like_x("mlp_block", x, {
        "norm_weight": (norm_weight, (dim,)),
        "norm_bias": (norm_bias, (dim,)),
        "fc1_weight": (fc1_weight, None),
        "fc1_bias": (fc1_bias, (hidden,)),
        "fc2_weight": (fc2_weight, (dim, hidden)),
        "fc2_bias": (fc2_bias, (dim,)),
        "gamma": (gamma, (dim,)),
    })
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


def _fake(x, *args):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _example(generator):
    """Small odd-shaped float64 inputs (dcvit doctor): schema arguments and options."""
    dim, hidden, tokens = 40, 72, 37

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale

    weights = (1 + rnd(dim, scale=0.2), rnd(dim, scale=0.1), rnd(hidden, dim, scale=dim**-0.5),
               rnd(hidden, scale=0.1), rnd(dim, hidden, scale=hidden**-0.5), rnd(dim, scale=0.1))
    return (rnd(2, tokens, dim), *weights, 1e-6, rnd(dim).abs() + 0.1), {}


MLP_BLOCK = define_op(OpDef(
    name="mlp_block",
    schema="(Tensor x, Tensor norm_weight, Tensor norm_bias, Tensor fc1_weight, Tensor fc1_bias, "
           "Tensor fc2_weight, Tensor fc2_bias, float eps, Tensor? gamma) -> Tensor",
    reference=mlp_block_ref,
    fake=_fake,
    triton=mlp_block_triton,
    # fold_layer_norm's result for fc1, all three or none (see mlp_block)
    triton_options={"fc1_folded": (FoldedNorm, "Tensor? fc1_folded_weight=None, "
                                               "Tensor? fc1_folded_bias=None, Tensor? fc1_weight_sums=None")},
    gemm=True,
    example=_example,
))
OP = MLP_BLOCK.name


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
    return MLP_BLOCK(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, float(eps),
                     gamma, backend=backend, fc1_folded=fc1_folded)


def mlp_block_backends(x, *weights, gamma=None, eps=1e-6) -> dict[str, str | None]:
    """Each backend's reason for refusing these inputs (None: available)."""
    return MLP_BLOCK.reasons(x, *weights, float(eps), gamma)
