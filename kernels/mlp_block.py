"""Fused MLP-only block: out = x + gamma * fc2(inner_norm(mlp(fc1(LayerNorm(x))))), where mlp is
act(h) or, gated (timm GluMlp / SwiGLU), act(h[:, :H]) * h[:, H:].

Three kernels (from fused_linear), four with the inner norm; fc1 and fc2 stay separate
because the whole D-wide output row of fc2 cannot stay in registers next to an H-wide hidden
tile:
  1. `_row_stats_kernel`: each row's LayerNorm mean and rstd (8 bytes a row).
  2. `_norm_linear_kernel` with the activation: fc1 as a plain GEMM on the LayerNorm-folded
     weights, mean/rstd, bias and the activation in the epilogue; gated, both halves of fc1
     in the same GEMM (pairs of columns) and the gate product in the epilogue. The
     normalized x is never written.
  3. (inner norm only) `_row_stats_kernel` over the (M, H) hidden: its mean and rstd.
  4. `_linear_residual_kernel`: fc2 with bias, LayerScale and the residual add in the
     epilogue; with the inner norm, fc2's weights carry its affine folded in
     (fold_layer_norm) and the epilogue applies the hidden's statistics.
Memory traffic is x read ~3x (from L2 after the first), hidden written and read once (twice
with the inner norm), out written once: the floor is the two GEMMs' FLOPs.
"""
import torch

from .fused_linear import ACTIVATIONS, NormStats, fold_layer_norm, linear_residual, ln_linear, row_stats
from .launching import launch_directly

__all__ = ["ACTIVATIONS", "activation_ref", "mlp_block_ref", "mlp_block_triton"]


def activation_ref(h, act):
    """The activations as timm computes them (nn.GELU, GELU(approximate='tanh'), QuickGELU,
    nn.SiLU)."""
    if act == "gelu":
        return torch.nn.functional.gelu(h)
    if act == "gelu_tanh":
        return torch.nn.functional.gelu(h, approximate="tanh")
    if act == "quick_gelu":
        return h * torch.sigmoid(1.702 * h)
    if act == "silu":
        return torch.nn.functional.silu(h)
    raise ValueError(f"mlp_block: act must be one of {ACTIVATIONS}, got {act!r}")


def mlp_block_ref(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                  eps=1e-6, gamma=None, act="gelu", gated=False, inner_norm_weight=None,
                  inner_norm_bias=None):
    """Plain-PyTorch definition of the op (timm's Block MLP branch with its residual; gated:
    fc1's rows [0, H) are the activated half, [H, 2H) the linear half)."""
    h = torch.nn.functional.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    h = torch.nn.functional.linear(h, fc1_weight, fc1_bias)
    if gated:
        gate, value = h.chunk(2, dim=-1)
        h = activation_ref(gate, act) * value
    else:
        h = activation_ref(h, act)
    if inner_norm_weight is not None:
        h = torch.nn.functional.layer_norm(h, (h.shape[-1],), inner_norm_weight, inner_norm_bias, eps)
    y = torch.nn.functional.linear(h, fc2_weight, fc2_bias)
    return x + (y * gamma if gamma is not None else y)


def mlp_block_triton(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                     eps=1e-6, gamma=None, act="gelu", gated=False, inner_norm_weight=None,
                     inner_norm_bias=None, *, fc1_folded=None, fc2_folded=None, out=None, launch=None):
    """Runs the fused kernels (arguments in the op's schema order); writes into `out` when
    given (tests poison it).

    `fc1_folded` is fused_linear.fold_layer_norm(norm_weight, norm_bias, fc1_weight, fc1_bias)
    and `fc2_folded` (inner norm only) fold_layer_norm(inner_norm_weight, inner_norm_bias,
    fc2_weight, fc2_bias), made once by the caller (the engine); without them the weights are
    folded per call.
    `launch` wraps each kernel (wrap_triton inside the op, a recorder in the codegen gate);
    the default launches directly."""
    launch = launch or launch_directly
    dim = x.shape[-1]
    rows_in = x.reshape(-1, dim)
    if not rows_in.is_contiguous():
        rows_in = rows_in.contiguous()
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    hidden = ln_linear(rows_in, norm_weight, norm_bias, fc1_weight, fc1_bias, eps,
                       act=act, gated=gated, launch=launch, folded=fc1_folded)
    if inner_norm_weight is None:
        linear_residual(hidden, fc2_weight, fc2_bias, gamma, rows_in, out.view(-1, dim), launch=launch)
        return out
    if fc2_folded is None:
        fc2_folded = fold_layer_norm(inner_norm_weight, inner_norm_bias, fc2_weight, fc2_bias)
    # as in ln_linear: fp32 hidden rows are centred by the statistics pass, half-precision
    # ones keep the mean term in fc2's epilogue
    centred = torch.empty_like(hidden) if hidden.dtype == torch.float32 else None
    mean, rstd = row_stats(hidden, eps, launch=launch, centred=centred)
    stats = NormStats(mean, rstd, None if centred is not None else fc2_folded.sums)
    linear_residual(centred if centred is not None else hidden, fc2_folded.weight, fc2_folded.bias,
                    gamma, rows_in, out.view(-1, dim), launch=launch, norm=stats)
    return out
