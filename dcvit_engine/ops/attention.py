"""The fused attention block with pruned heads and channels,
    out = x + gamma * proj(MHA(LayerNorm(x))).

Head h of the kept heads attends with softmax(scale * q_h k_h^T + key_bias[b]) v_h, q_h and
k_h of width qk_dims[h], v_h of width v_dims[h] (the spec's AttentionSpec; scale is the
teacher's, kept after channel pruning). Backends: torch (kernels.attention.attention_block_ref),
cpu and cuda (torch.ops.dcvit.attention_block from dcvit_engine._C), triton
(torch.ops.dcvit.attention_block_triton, a torch.library.triton_op).
"""
import math
import operator

import torch

from dcvit_engine import _native
from dcvit_engine.kernels.attention import (attention_block_ref, attention_block_triton,
                                            flash_attention_why_not)
from dcvit_engine.kernels.fused_linear import FoldedNorm
from dcvit_engine.ops.dispatch import Impl, OpDispatcher, standard_impls, triton_gemm_why_not
from dcvit_engine.ops.mlp_block import check_folded
from dcvit_engine.ops.registration import KERNEL_LAUNCHER, triton_kernel_op

OP = "attention_block"


def head_widths(qk_dims, v_dims) -> tuple[list[int], list[int]]:
    """The per-head widths as int lists; ValueError when they are not one positive int per
    kept head in each list."""
    widths = []
    for name, dims in (("qk_dims", qk_dims), ("v_dims", v_dims)):
        try:
            ints = [operator.index(d) for d in dims]
        except TypeError:
            raise ValueError(f"attention_block: {name} must be a list of ints (one width per kept "
                             f"head), got {dims!r}") from None
        if any(d < 1 for d in ints):
            raise ValueError(f"attention_block: every width in {name} must be >= 1, got {ints}")
        widths.append(ints)
    qk, v = widths
    if not qk or len(qk) != len(v):
        raise ValueError(f"attention_block: qk_dims and v_dims must list the same number (>= 1) of "
                         f"heads, got {len(qk)} and {len(v)}")
    return qk, v


def check_attention_block_args(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight,
                               proj_bias, qk_dims, v_dims, scale, gamma, key_bias):
    """Raises ValueError naming the argument whose shape, dtype, device or value is off;
    returns the widths as int lists."""
    if x.dim() != 3:
        raise ValueError(f"attention_block: x must be (B, N, D), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"attention_block: x must be a floating-point tensor, got {x.dtype}")
    qk_dims, v_dims = head_widths(qk_dims, v_dims)
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"attention_block: scale must be a positive finite float (the teacher's "
                         f"head_dim ** -0.5), got {scale!r}")
    batch, tokens, dim = x.shape
    qk_total, v_total = sum(qk_dims), sum(v_dims)
    qkv_rows = 2 * qk_total + v_total
    if tuple(qkv_weight.shape) != (qkv_rows, dim):
        raise ValueError(
            f"attention_block: qkv_weight must be (2*sum(qk_dims)+sum(v_dims)={qkv_rows}, D={dim}) "
            f"for qk_dims={list(qk_dims)}, v_dims={list(v_dims)}, got {tuple(qkv_weight.shape)}; "
            "the widths must describe the packed [q heads | k heads | v heads] rows")
    expected = {
        "norm_weight": (norm_weight, (dim,)),
        "norm_bias": (norm_bias, (dim,)),
        "qkv_bias": (qkv_bias, (qkv_rows,)),
        "proj_weight": (proj_weight, (dim, v_total)),
        "proj_bias": (proj_bias, (dim,)),
        "gamma": (gamma, (dim,)),
        "key_bias": (key_bias, (batch, tokens)),
    }
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"attention_block: {name} must have shape {shape}, got {tuple(tensor.shape)}")
    for name, tensor in [("qkv_weight", qkv_weight)] + [(n, t) for n, (t, _) in expected.items()]:
        if tensor is None:
            continue
        if tensor.dtype != x.dtype:
            raise ValueError(f"attention_block: {name} is {tensor.dtype} but x is {x.dtype}; cast all to one dtype")
        if tensor.device != x.device:
            raise ValueError(f"attention_block: {name} is on {tensor.device} but x is on {x.device}")
    return qk_dims, v_dims


def _attention_block_fake(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias,
                          qk_dims, v_dims, scale, eps, gamma, key_bias, qkv_folded_weight=None,
                          qkv_folded_bias=None, qkv_weight_sums=None):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@triton_kernel_op("dcvit::attention_block_triton", fake=_attention_block_fake)
def _attention_block_triton_op(
    x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor | None, proj_weight: torch.Tensor, proj_bias: torch.Tensor | None,
    qk_dims: list[int], v_dims: list[int], scale: float, eps: float,
    gamma: torch.Tensor | None, key_bias: torch.Tensor | None,
    qkv_folded_weight: torch.Tensor | None = None, qkv_folded_bias: torch.Tensor | None = None,
    qkv_weight_sums: torch.Tensor | None = None,
) -> torch.Tensor:
    # the three qkv_folded tensors: fold_layer_norm's result, all or none (see attention_block)
    folded = None if qkv_folded_weight is None else \
        FoldedNorm(qkv_folded_weight, qkv_folded_bias, qkv_weight_sums)
    return attention_block_triton(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight,
                                  proj_bias, qk_dims, v_dims, scale, gamma=gamma, key_bias=key_bias,
                                  eps=eps, kernel_launcher=KERNEL_LAUNCHER, qkv_folded=folded)


if _native.LOAD_ERROR is None:
    torch.library.register_fake("dcvit::attention_block")(_attention_block_fake)

# Resolve the compiled kernels' availability now, outside any torch.compile trace.
_native.native_unavailable(OP, "CPU")
_native.native_unavailable(OP, "CUDA")


# Every impl gets (x, 6 weights, qk_dims, v_dims, scale, eps, gamma, key_bias, qkv_folded);
# only Triton uses qkv_folded.
def _run_torch(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias,
               qk_dims, v_dims, scale, eps, gamma, key_bias, _folded):
    return attention_block_ref(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight,
                               proj_bias, qk_dims, v_dims, scale, gamma=gamma, key_bias=key_bias,
                               eps=eps)


def _run_native(*args):
    return torch.ops.dcvit.attention_block(*args[:-1])


def _run_triton(*args):
    *rest, folded = args
    return torch.ops.dcvit.attention_block_triton(*rest, *(folded if folded is not None else ()))


def _triton_why_not(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias,
                    qk_dims, v_dims, *rest):
    # the GEMMs' shared refusals (fp32 on CUDA among them), then the head layout's
    return triton_gemm_why_not([x]) or flash_attention_why_not(qk_dims, v_dims)


# Backend order: dispatch.PRIORITY["attention_block"].
_DISPATCH = OpDispatcher(OP, [
    impl if impl.backend != "triton" else Impl("triton", _triton_why_not, _run_triton)
    for impl in standard_impls(OP, _run_torch, _run_native, _run_triton)])


def attention_block(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias,
                    qk_dims, v_dims, scale, *, eps=1e-6, gamma=None, key_bias=None, backend=None,
                    qkv_folded: FoldedNorm | None = None):
    """x + gamma * proj(MHA(LayerNorm(x))) for x (B, N, D) with pruned heads and channels.

    qkv_weight (2*sum(qk_dims)+sum(v_dims), D) packed [q_0|q_1|..|k_0|k_1|..|v_0|v_1|..];
    qkv_bias of that length or None; head h attends with
    softmax(scale * q_h k_h^T + key_bias[b, None, :]) v_h, q_h/k_h of width qk_dims[h] and v_h
    of width v_dims[h]; proj_weight (D, sum(v_dims)), proj_bias (D,) or None; gamma LayerScale
    (D,) or None; key_bias (B, N) additive per-key bias (ToMe's proportional attention:
    log of each token's size) or None. `backend` in {torch, cpu, cuda, triton} forces one
    implementation (else DCVIT_BACKEND, else the device's priority list). `qkv_folded`:
    kernels.fused_linear.fold_layer_norm(norm_weight, norm_bias, qkv_weight, qkv_bias), made
    once (the engine does at build time) for the Triton impl; without it Triton folds per call.
    The Triton impl takes heads up to 128 wide; it is fastest when every width is a multiple
    of 16 (build_engine pads heads so once; the Triton impl pads other widths per call, see
    kernels/head_padding.py).
    """
    qk_dims, v_dims = check_attention_block_args(x, norm_weight, norm_bias, qkv_weight, qkv_bias,
                                                 proj_weight, proj_bias, qk_dims, v_dims, scale,
                                                 gamma, key_bias)
    if qkv_folded is not None:
        check_folded(qkv_folded, qkv_weight, x, name="qkv_folded")
    args = (x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias,
            qk_dims, v_dims, float(scale), float(eps), gamma, key_bias, qkv_folded)
    return _DISPATCH(x.device, *args, backend=backend)


def attention_block_backends(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight,
                             proj_bias, qk_dims, v_dims, scale, *, eps=1e-6, gamma=None,
                             key_bias=None) -> dict[str, str | None]:
    """Each backend's reason for refusing these inputs (None: available)."""
    qk_dims, v_dims = head_widths(qk_dims, v_dims)
    return _DISPATCH.reasons(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight,
                             proj_bias, qk_dims, v_dims, float(scale), float(eps), gamma, key_bias,
                             None)
