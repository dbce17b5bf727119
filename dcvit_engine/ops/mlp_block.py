"""The fused MLP-only block, y = x + gamma * fc2(inner_norm(act(fc1(LayerNorm(x))))).

This is what DC-ViT leaves where it removes a block's attention, and every block's MLP half.
The activation is exact GELU (the default), tanh GELU, QuickGELU or SiLU; `gated` (timm
GluMlp / SwiGLU) makes fc1 (2H, D) with rows [0, H) activated and [H, 2H) linear, and
act(first) * second goes into fc2 (D, H); the inner norm (timm `mlp.norm`) is a LayerNorm
over the H hidden channels before fc2, with the block norm's eps. Backends: torch
(kernels.mlp_block.mlp_block_ref), cpu and cuda (torch.ops.dcvit.mlp_block from
dcvit_engine._C), triton (kernels.mlp_block.mlp_block_triton; see ops/define.py).
"""
from functools import partial

import torch

from dcvit_engine.kernels.fused_linear import ACTIVATIONS, FoldedNorm
from dcvit_engine.kernels.mlp_block import mlp_block_ref, mlp_block_triton
from dcvit_engine.ops.checks import check_folded, check_like_x
from dcvit_engine.ops.define import OpDef, define_op


def check_mlp_block_args(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                         gamma, act="gelu", gated=False, inner_norm_weight=None, inner_norm_bias=None):
    """Raises ValueError naming the argument whose shape, dtype, device or value is off."""
    if x.dim() < 2:
        raise ValueError(f"mlp_block: x must be (..., D), got shape {tuple(x.shape)}")
    if act not in ACTIVATIONS:
        raise ValueError(f"mlp_block: act must be one of {ACTIVATIONS}, got {act!r}")
    dim = x.shape[-1]
    if fc1_weight.dim() != 2 or fc1_weight.shape[1] != dim or fc1_weight.shape[0] < 1:
        raise ValueError(f"mlp_block: fc1_weight must be (H >= 1, D={dim}), got {tuple(fc1_weight.shape)}")
    width = fc1_weight.shape[0]
    if gated and width % 2:
        raise ValueError(f"mlp_block: gated fc1_weight must be (2H, D) with its activated half first, "
                         f"got an odd {width} rows")
    hidden = width // 2 if gated else width
    if (inner_norm_weight is None) != (inner_norm_bias is None):
        raise ValueError("mlp_block: give inner_norm_weight and inner_norm_bias together, or neither")
    check_like_x("mlp_block", x, {
        "norm_weight": (norm_weight, (dim,)),
        "norm_bias": (norm_bias, (dim,)),
        "fc1_weight": (fc1_weight, None),
        "fc1_bias": (fc1_bias, (width,)),
        "fc2_weight": (fc2_weight, (dim, hidden)),
        "fc2_bias": (fc2_bias, (dim,)),
        "gamma": (gamma, (dim,)),
        "inner_norm_weight": (inner_norm_weight, (hidden,)),
        "inner_norm_bias": (inner_norm_bias, (hidden,)),
    })
    if not x.is_floating_point():
        raise ValueError(f"mlp_block: x must be a floating-point tensor, got {x.dtype}")


def _fake(x, *args):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# dcvit doctor's variants beside the example (timm's ViT MLP): (act, gated, inner norm)
VARIANTS = {"gelu_tanh+inner_norm": ("gelu_tanh", False, True), "quick_gelu": ("quick_gelu", False, False),
            "swiglu": ("silu", True, False), "swiglu+inner_norm": ("silu", True, True),
            "geglu": ("gelu", True, False)}


def _example(generator, act="gelu", gated=False, inner_norm=False):
    """Small odd-shaped float64 inputs (dcvit doctor): schema arguments and options."""
    dim, hidden, tokens = 40, 71, 37
    width = 2 * hidden if gated else hidden

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale

    weights = (1 + rnd(dim, scale=0.2), rnd(dim, scale=0.1), rnd(width, dim, scale=dim**-0.5),
               rnd(width, scale=0.1), rnd(dim, hidden, scale=hidden**-0.5), rnd(dim, scale=0.1))
    inner = (1 + rnd(hidden, scale=0.2), rnd(hidden, scale=0.1)) if inner_norm else (None, None)
    return (rnd(2, tokens, dim), *weights, 1e-6, rnd(dim).abs() + 0.1, act, gated, *inner), {}


def _public(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *,
            eps=1e-6, gamma=None, act="gelu", gated=False, inner_norm_weight=None,
            inner_norm_bias=None):
    """x + gamma * fc2(inner_norm(act(fc1(LayerNorm(x))))) for x (..., D), fc1 (H, D), fc2 (D, H).

    gamma is LayerScale (D,) or None. `act` in ACTIVATIONS ("gelu" exact, "gelu_tanh",
    "quick_gelu", "silu"). `gated`: fc1 (2H, D), fc1_bias (2H,), rows [0, H) the half `act`
    applies to and [H, 2H) the linear half; fc2 gets act(first) * second. inner_norm_weight /
    inner_norm_bias (H,): LayerNorm (eps `eps`) of the hidden before fc2, or None.
    `backend` in {torch, cpu, cuda, triton} forces one implementation (else DCVIT_BACKEND,
    else the device's priority list). `fc1_folded`:
    kernels.fused_linear.fold_layer_norm(norm_weight, norm_bias, fc1_weight, fc1_bias) and
    `fc2_folded`: fold_layer_norm(inner_norm_weight, inner_norm_bias, fc2_weight, fc2_bias),
    made once (the engine does at build time) for the Triton impl; without them Triton folds
    per call.
    """
    return (x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, float(eps), gamma,
            act, bool(gated), inner_norm_weight, inner_norm_bias)


def _check(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, gamma, act,
           gated, inner_norm_weight, inner_norm_bias, fc1_folded=None, fc2_folded=None):
    check_mlp_block_args(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma,
                         act, gated, inner_norm_weight, inner_norm_bias)
    if fc1_folded is not None:
        check_folded(fc1_folded, fc1_weight, x)
    if fc2_folded is not None:
        if inner_norm_weight is None:
            raise ValueError("mlp_block: fc2_folded (the inner norm folded into fc2) needs inner_norm_weight")
        check_folded(fc2_folded, fc2_weight, x, name="fc2_folded")


MLP_BLOCK = define_op(OpDef(
    name="mlp_block",
    schema="(Tensor x, Tensor norm_weight, Tensor norm_bias, Tensor fc1_weight, Tensor fc1_bias, "
           "Tensor fc2_weight, Tensor fc2_bias, float eps, Tensor? gamma, str act=\"gelu\", "
           "bool gated=False, Tensor? inner_norm_weight=None, Tensor? inner_norm_bias=None) -> Tensor",
    backends=("torch", "cpu", "cuda", "triton"),
    reference=mlp_block_ref,
    fake=_fake,
    triton=mlp_block_triton,
    check=_check,
    public=_public,
    # fold_layer_norm's results, all three fields or none (see mlp_block): fc1's with the
    # block norm, fc2's with the inner norm
    triton_options={"fc1_folded": (FoldedNorm, "Tensor? fc1_folded_weight=None, "
                                               "Tensor? fc1_folded_bias=None, Tensor? fc1_weight_sums=None"),
                    "fc2_folded": (FoldedNorm, "Tensor? fc2_folded_weight=None, "
                                               "Tensor? fc2_folded_bias=None, Tensor? fc2_weight_sums=None")},
    gemm=True,
    example=_example,
    variants={name: partial(_example, act=act, gated=gated, inner_norm=inner)
              for name, (act, gated, inner) in VARIANTS.items()},
))
OP = MLP_BLOCK.name
mlp_block = MLP_BLOCK.function
mlp_block_backends = MLP_BLOCK.backends_function
