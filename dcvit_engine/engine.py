"""The engine: a spec's ViT run through dcvit_engine's fused ops.

build_engine() takes a timm VisionTransformer, a ViTReference or an artifact folder and
prepares the weights once (cast to the run dtype, moved, made contiguous, prefix tokens
with their position embedding pre-added). Engine.forward computes exactly what
ViTReference computes: patch embedding, prefix tokens + position embedding, per block the
attention residual, the token merge and the MLP residual, the final norm, pooling and
head(s). On a CUDA device each batch size is captured once as a CUDA graph and replayed.
"""
from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .adapter import from_timm
from .devices import resolve_device
from .dtypes import (  # noqa: F401  (the dtype policy is dtypes.py's; importable here for one release)
    DTYPES,
    command_dtype,
    cpu_has_native_bf16,
    default_dtype,
    parse_dtype,
)
from .errors import InputError
from .kernels.fused_linear import fold_layer_norm
from .kernels.head_padding import pad_heads, padded_width
from .ops.attention import ATTENTION_BLOCK, ATTENTION_BLOCK_KEY_MEAN
from .ops.dispatch import ENV_VAR, requested_backend
from .ops.mlp_block import MLP_BLOCK
from .reference import ViTReference, classify, merge_tokens
from .rope import half_rotation_order, rope_tables
from .spec import MergeSpec, ViTSpec, merge_schedule

GRAPH_WARMUP_RUNS = 3  # eager runs on a side stream before capture (cuBLAS/Triton autotune, lazy init)


class EngineBlock(nn.Module):
    """One block's prepared weights and static structure (head widths, merge, grid)."""

    def __init__(self, spec: ViTSpec, index: int, state: dict, prepare, grid_in):
        super().__init__()
        block = spec.blocks[index]
        name = f"blocks.{index}."
        self.eps = spec.norm_eps
        self.merge: MergeSpec | None = block.merge
        self.grid_in = grid_in  # patch grid entering the block (None after a ToMe merge)
        self.has_attn = block.attn is not None
        self.has_mlp = block.mlp_hidden > 0
        self.mlp_hidden = block.mlp_hidden
        self.mlp_act, self.mlp_gated = block.mlp_act, block.mlp_gated
        self.qk_norm = self.rope = False
        self.unbind()
        if self.has_attn:
            attn = block.attn
            self.qk_dims, self.v_dims = list(attn.qk_dims), list(attn.v_dims)
            self.scale = float(attn.scale)
            self.qk_norm = attn.qk_norm
            self.rope = spec.rope is not None
            self.register_buffer("norm1_weight", prepare(state[name + "norm1.weight"]))
            self.register_buffer("norm1_bias", prepare(state[name + "norm1.bias"]))
            self.register_buffer("qkv_weight", prepare(state[name + "attn.qkv.weight"]))
            self.register_buffer("qkv_bias", _optional(state, name + "attn.qkv.bias", prepare))
            self.register_buffer("proj_weight", prepare(state[name + "attn.proj.weight"]))
            self.register_buffer("proj_bias", _optional(state, name + "attn.proj.bias", prepare))
            self.register_buffer("ls1", _optional(state, name + "ls1.gamma", prepare))
            for norm in ("q_norm", "k_norm"):
                for part in ("weight", "bias"):
                    self.register_buffer(f"{norm}_{part}",
                                         _optional(state, f"{name}attn.{norm}.{part}", prepare))
            for part in ("weight", "bias"):  # attn.norm: the inner norm before proj
                self.register_buffer(f"inner_norm_{part}",
                                     _optional(state, f"{name}attn.norm.{part}", prepare))
            if self.rope:
                self._rotate_half_layout(spec, state.get(name + "attn.rope_freqs"))
            self._pad_heads()
        if self.has_mlp:
            for key, buffer in (("norm2.weight", "norm2_weight"), ("norm2.bias", "norm2_bias"),
                                ("mlp.fc1.weight", "fc1_weight"), ("mlp.fc1.bias", "fc1_bias"),
                                ("mlp.fc2.weight", "fc2_weight"), ("mlp.fc2.bias", "fc2_bias")):
                self.register_buffer(buffer, prepare(state[name + key]))
            self.register_buffer("ls2", _optional(state, name + "ls2.gamma", prepare))
            self.register_buffer("mlp_norm_weight", _optional(state, name + "mlp.norm.weight", prepare))
            self.register_buffer("mlp_norm_bias", _optional(state, name + "mlp.norm.bias", prepare))

    def _rotate_half_layout(self, spec: ViTSpec, freqs) -> None:
        """RoPE for the attention op (its contract: the half layout, tables per q channel).
        Each head's q and k rows (and q/k-norm weights) are reordered into the half layout
        (rope.half_rotation_order: exact, q.k is unchanged by a permutation of both), and the
        tables get one row per token: the prefix tokens' rows rotate by nothing (cos 1, sin 0).
        Float32 tables (the op's contract), as timm takes its angles in float32."""
        order = half_rotation_order(spec).to(self.qkv_weight.device)
        heads, width = len(self.qk_dims), self.qk_dims[0]  # RoPE keeps every q/k head whole
        rows = torch.cat([h * width + order for h in range(heads)])
        rows = torch.cat([rows, heads * width + rows, 2 * heads * width +
                          torch.arange(sum(self.v_dims), device=rows.device)])
        self.qkv_weight = self.qkv_weight[rows].contiguous()
        if self.qkv_bias is not None:
            self.qkv_bias = self.qkv_bias[rows].contiguous()
        if self.qk_norm:
            for norm in ("q_norm_weight", "q_norm_bias", "k_norm_weight", "k_norm_bias"):
                setattr(self, norm, getattr(self, norm)[order].contiguous())
        sin, cos = rope_tables(spec, layout="half", dtype=torch.float32, device=self.qkv_weight.device,
                               freqs=freqs)
        if sin.dim() == 2:  # one table for every head
            sin, cos = sin.repeat(1, heads), cos.repeat(1, heads)
        else:  # mixed: each head its own table, side by side in the packed q channels
            sin, cos = sin.permute(1, 0, 2).flatten(1), cos.permute(1, 0, 2).flatten(1)
        prefix = spec.num_prefix_tokens
        self.register_buffer("rope_sin", F.pad(sin, (0, 0, prefix, 0), value=0.0).contiguous())
        self.register_buffer("rope_cos", F.pad(cos, (0, 0, prefix, 0), value=1.0).contiguous())

    def _pad_heads(self) -> None:
        """The widths the attention op runs (`kernel_qk_dims`, `kernel_v_dims`): every head
        zero-padded to a multiple of 16 (see head_padding), except q_norm/k_norm blocks (a
        LayerNorm over each head's real width, which zero columns would change), and except
        merging blocks with heads of different q/k widths: the op averages the keys over heads
        of one width (the merge metric), where ragged heads' keys go side by side, so padding
        them to one width would change the metric. qk_dims/v_dims stay the real widths."""
        self.kernel_qk_dims, self.kernel_v_dims = self.qk_dims, self.v_dims
        if self.qk_norm or self.rope or self.inner_norm_weight is not None:
            return  # norms over a head's (or all heads') real width, and RoPE's pairs, need them unpadded
        if self.merge is not None and len(set(self.qk_dims)) > 1:
            return
        padded = pad_heads(self.qk_dims, self.v_dims, self.qkv_weight, self.qkv_bias, self.proj_weight)
        if padded.qk_dims == self.qk_dims and padded.v_dims == self.v_dims:
            return
        self.kernel_qk_dims, self.kernel_v_dims = padded.qk_dims, padded.v_dims
        self.qkv_weight, self.qkv_bias = padded.qkv_weight, padded.qkv_bias
        self.proj_weight = padded.proj_weight

    def unbind(self) -> None:
        """Forget the ops' bound calls (bind_attention, bind_mlp): the weights or the backend
        they were chosen for changed."""
        self.attention_call = self.mlp_call = None

    def __getstate__(self):
        # a copy (copy.deepcopy, pickle) binds its own calls: these hold the original's tensors
        return {**super().__getstate__(), "attention_call": None, "mlp_call": None}

    def extra_repr(self) -> str:
        parts = []
        if self.has_attn:
            dims = [f"{len(d)}x{d[0]}" if len(set(d)) == 1 else str(d) for d in (self.qk_dims, self.v_dims)]
            parts.append(f"attn qk {dims[0]}, v {dims[1]}" + (", qk_norm" if self.qk_norm else ""))
        if self.merge is not None:
            parts.append(f"merge {self.merge.kind} " + (f"r={self.merge.r}" if self.merge.kind == "tome"
                                                        else f"axis={self.merge.axis}"))
        if self.has_mlp:
            parts.append(f"mlp {self.mlp_hidden}")  # the spec's width, not the padded one
        return "; ".join(parts) or "identity"


def _mlp_hints(block: EngineBlock) -> dict:
    """The Triton MLP's folded weights (fold_block_norms), passed only where they exist."""
    hints = dict(fc1_folded=block.fc1_folded)
    if block.fc2_folded is not None:
        hints["fc2_folded"] = block.fc2_folded
    return hints


def _optional(state: dict, key: str, prepare):
    tensor = state.get(key)
    return None if tensor is None else prepare(tensor)


def bind_attention(block: EngineBlock, x: torch.Tensor, key_bias: torch.Tensor | None,
                   backend: str | None):
    """The block's attention op as `call(x, key_bias)`: its arguments gathered, checked and its
    backend chosen once (Op.bind), on the first forward; later forwards (the same token count
    per block, images checked by Engine.check_images) call the chosen implementation directly."""
    norms = ((block.q_norm_weight, block.q_norm_bias, block.k_norm_weight, block.k_norm_bias)
             if block.qk_norm else (None,) * 4)
    rope = (block.rope_cos, block.rope_sin) if block.rope else (None, None)
    head = (block.norm1_weight, block.norm1_bias, block.qkv_weight, block.qkv_bias, block.proj_weight,
            block.proj_bias, list(block.kernel_qk_dims), list(block.kernel_v_dims), block.scale,
            float(block.eps), block.ls1)
    tail = (*norms, *rope, None, block.inner_norm_weight, block.inner_norm_bias)
    options = {} if block.qkv_folded is None else {"qkv_folded": block.qkv_folded}
    op = ATTENTION_BLOCK if block.merge is None else ATTENTION_BLOCK_KEY_MEAN  # merging: with the metric
    run = op.bind(x, *head, key_bias, *tail, backend=backend, **options)
    return lambda x, key_bias: run(x, *head, key_bias, *tail, **options)


def bind_mlp(block: EngineBlock, x: torch.Tensor, eps: float, backend: str | None):
    """The block's MLP op as `call(x)`, bound once as bind_attention binds the attention op."""
    args = (block.norm2_weight, block.norm2_bias, block.fc1_weight, block.fc1_bias, block.fc2_weight,
            block.fc2_bias, float(eps), block.ls2, block.mlp_act, bool(block.mlp_gated),
            block.mlp_norm_weight, block.mlp_norm_bias)
    options = {k: v for k, v in _mlp_hints(block).items() if v is not None}
    run = MLP_BLOCK.bind(x, *args, backend=backend, **options)
    return lambda x: run(x, *args, **options)


def attention_residual(block: EngineBlock, x: torch.Tensor, key_bias: torch.Tensor | None,
                       want_metric: bool, backend: str | None, bound: bool = False):
    """x + gamma * proj(MHA(LN(x))) through the attention op, and the merge metric (see
    reference.merge_metric) when want_metric, else None.

    Every backend of the op computes q/k-norm, RoPE and the inner norm. A merging block runs
    attention_block_key_mean, which also returns the metric from the keys the op computes
    (no second LayerNorm and K projection); merges and RoPE do not meet (the spec refuses
    them together).

    The op is the public, checked one, or with `bound` the block's bound call (bind_attention).
    """
    q_norm = k_norm = None
    if block.qk_norm:
        q_norm = (block.q_norm_weight, block.q_norm_bias)
        k_norm = (block.k_norm_weight, block.k_norm_bias)
    if bound:
        if block.attention_call is None:
            block.attention_call = bind_attention(block, x, key_bias, backend)
        out = block.attention_call(x, key_bias)
    else:
        op = ops.attention_block_key_mean if want_metric else ops.attention_block
        out = op(x, block.norm1_weight, block.norm1_bias, block.qkv_weight,
                 block.qkv_bias, block.proj_weight, block.proj_bias,
                 block.kernel_qk_dims, block.kernel_v_dims, block.scale,
                 eps=block.eps, gamma=block.ls1, key_bias=key_bias, q_norm=q_norm,
                 k_norm=k_norm, rope_cos=block.rope_cos if block.rope else None,
                 rope_sin=block.rope_sin if block.rope else None,
                 inner_norm_weight=block.inner_norm_weight,
                 inner_norm_bias=block.inner_norm_bias, backend=backend,
                 qkv_folded=block.qkv_folded)
    if not want_metric:
        return out, None
    out, metric = out
    if block.kernel_qk_dims != block.qk_dims:  # padded heads of one width: real columns first
        metric = metric[..., :block.qk_dims[0]]
    return out, metric


def runs_triton(engine: "Engine") -> bool:
    """Whether a Triton op may run: on CUDA (by the ops' priority) or when requested."""
    return engine.device.type == "cuda" or engine.backend == "triton"


def pad_mlp_hidden(engine: "Engine") -> None:
    """Zero-pad each MLP's hidden width as head widths are (head_padding.padded_width, a
    multiple of 16 elements: the Triton GEMMs' loads vectorize to 16-byte cp.async only when
    widths and row strides are such multiples). Extra fc1 rows and
    bias entries of zero give GELU(0) = 0 activations, which meet zero fc2 columns, so the
    result is exact. MACs and `dcvit info` read the spec, which keeps the real width."""
    for block in engine.blocks:
        if not block.has_mlp or block.mlp_gated or block.mlp_norm_weight is not None:
            continue  # a gated fc1 pairs its two halves; an inner norm averages over the real width
        hidden = block.fc1_weight.shape[0]
        extra = padded_width(hidden) - hidden  # idempotent
        if extra:
            block.fc1_weight = F.pad(block.fc1_weight, (0, 0, 0, extra))
            block.fc1_bias = F.pad(block.fc1_bias, (0, extra))
            block.fc2_weight = F.pad(block.fc2_weight, (0, extra))


def fold_block_norms(engine: "Engine") -> None:
    """Fold each block's LayerNorm affine into the Linear after it, once, for the Triton ops
    (kernels/fused_linear.py: fold_layer_norm): `fc1_folded` for the MLP, `qkv_folded` for
    attention; None where no Triton op can run (CPU without the interpreter backend), so
    the CPU engine holds no second copy of those weights. Plain attributes, not buffers:
    they are derived, never saved, and recomputed here whenever dtype or device change."""
    fold = runs_triton(engine)
    for block in engine.blocks:
        block.fc1_folded = fold_layer_norm(block.norm2_weight, block.norm2_bias, block.fc1_weight,
                                           block.fc1_bias) if fold and block.has_mlp else None
        block.qkv_folded = fold_layer_norm(block.norm1_weight, block.norm1_bias, block.qkv_weight,
                                           block.qkv_bias) if fold and block.has_attn else None
        inner = fold and block.has_mlp and block.mlp_norm_weight is not None
        block.fc2_folded = fold_layer_norm(block.mlp_norm_weight, block.mlp_norm_bias, block.fc2_weight,
                                           block.fc2_bias) if inner else None


def pack_patch_embedding(engine: "Engine") -> None:
    """On the CPU the patch embedding (a convolution whose stride is its kernel) runs as one
    GEMM over the patches, each patch's pixels gathered by a reshape: `patch_packed` is the
    weight as (D, C*p*p), packed once into oneDNN's blocked layout for mkldnn's fused linear
    (as csrc/cpu_linear.cpp packs the blocks' weights). ATen's convolution reorders the
    weight, and in fp32 its output, on every call (ONEDNN_VERBOSE); see benchmarks/RESULTS.md
    for the measured ratio. None elsewhere (other devices, fp16, bf16 without native bf16
    instructions) and under torch.compile: the convolution runs. A plain attribute, derived,
    redone on every move."""
    weight = engine.patch_weight
    native = weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and cpu_has_native_bf16())
    if weight.device.type != "cpu" or not native or not torch.backends.mkldnn.is_available():
        engine.patch_packed = None
        return
    engine.patch_packed = torch.ops.mkldnn._reorder_linear_weight(weight.reshape(weight.shape[0], -1))


def embed_patches(engine: "Engine", images: torch.Tensor) -> torch.Tensor:
    """(B, grid_h * grid_w, D) patch tokens: the convolution, or its GEMM (pack_patch_embedding)."""
    patch = engine.spec.patch_size
    if engine.patch_packed is None or torch.compiler.is_compiling():  # Inductor lowers the conv itself
        x = F.conv2d(images, engine.patch_weight, engine.patch_bias, stride=patch)
        return x.flatten(2).transpose(1, 2)
    batch, chans = images.shape[:2]
    rows, cols = engine.spec.grid
    pixels = images[:, :, :rows * patch, :cols * patch].reshape(batch, chans, rows, patch, cols, patch)
    pixels = pixels.permute(0, 2, 4, 1, 3, 5).reshape(batch * rows * cols, chans * patch * patch)
    out = torch.ops.mkldnn._linear_pointwise(pixels, engine.patch_packed, engine.patch_bias, "none", [], "")
    return out.view(batch, rows * cols, -1)


class Engine(nn.Module):
    """A ViT prepared for inference with dcvit_engine's ops; call it on (B, C, H, W) images.

    Use build_engine() to make one. Buffers are fixed at build time (dtype, device); the
    forward pass has no autograd state. On CUDA, `cuda_graphs` captures one graph per batch
    size on first use and replays it (the output is a fresh tensor each call).
    """

    def __init__(self, spec: ViTSpec, state: dict[str, torch.Tensor], *, backend: str | None,
                 dtype: torch.dtype, device: torch.device, cuda_graphs: bool, compile: bool):
        super().__init__()
        self.spec = copy.deepcopy(spec.validate())
        self.backend = backend
        self.dtype = dtype
        self.device = device
        self._graphs_requested = cuda_graphs
        self.cuda_graphs = cuda_graphs and device.type == "cuda"

        def prepare(tensor: torch.Tensor) -> torch.Tensor:
            # always a copy: the engine must not follow later in-place edits of the source
            # model (its pre-added prefix tokens could not follow them)
            return tensor.detach().to(device=device, dtype=dtype, memory_format=torch.contiguous_format,
                                      copy=True)

        self.register_buffer("patch_weight", prepare(state["patch_embed.proj.weight"]))
        self.register_buffer("patch_bias", _optional(state, "patch_embed.proj.bias", prepare))
        pos = _optional(state, "pos_embed", prepare)  # None: no absolute position embedding
        # class, distillation, register tokens: the prefix, in timm's order
        prefix = [prepare(state[k]) for k in ("cls_token", "dist_token", "reg_token") if k in state]
        prefix = torch.cat(prefix, dim=1) if prefix else None
        num_prefix = spec.num_prefix_tokens
        if pos is not None and not spec.no_embed_class and num_prefix:
            # the prefix tokens' position embedding is constant: add it once, here
            prefix = prefix + pos[:, :num_prefix]
            pos = pos[:, num_prefix:]
        self.register_buffer("prefix_tokens", None if prefix is None else prefix.contiguous())
        self.register_buffer("pos_embed", None if pos is None else pos.contiguous())
        # the attention-pool head (global_pool 'map'): timm's AttentionPoolLatent, computed by the
        # reference's attention_pool on the final tokens (plain torch; one latent query per image)
        self.attn_pool = nn.Module()
        for key in sorted(k for k in state if k.startswith("attn_pool.")):
            buffer = key.removeprefix("attn_pool.").replace(".", "__")  # buffer names take no dots
            self.attn_pool.register_buffer(buffer, prepare(state[key]))
        for norm in ("norm_pre", "norm", "fc_norm"):
            self.register_buffer(f"{norm}_weight", _optional(state, f"{norm}.weight", prepare))
            self.register_buffer(f"{norm}_bias", _optional(state, f"{norm}.bias", prepare))
        for head in ("head", "head_dist"):
            self.register_buffer(f"{head}_weight", _optional(state, f"{head}.weight", prepare))
            self.register_buffer(f"{head}_bias", _optional(state, f"{head}.bias", prepare))
        schedule = merge_schedule(self.spec)
        self.blocks = nn.ModuleList(EngineBlock(self.spec, i, state, prepare, schedule[i][2])
                                    for i in range(spec.depth))
        if runs_triton(self):
            pad_mlp_hidden(self)
        fold_block_norms(self)
        pack_patch_embedding(self)
        self._graphs: dict[int, _CapturedGraph] = {}
        self._graph_pool = None
        self._bound_for = None  # the (backend, DCVIT_BACKEND) the blocks' calls were bound for
        self._run = torch.compile(self.forward_eager, fullgraph=True, dynamic=False) if compile \
            else self.forward_eager

    def _apply(self, fn, recurse=True):
        # engine.to(...) / .half() / .cuda(): keep the expected device and dtype in step with
        # the buffers; graphs captured for the old ones are dropped
        super()._apply(fn, recurse)
        self.device, self.dtype = self.patch_weight.device, self.patch_weight.dtype
        self.cuda_graphs = self._graphs_requested and self.device.type == "cuda"
        self._graphs.clear()
        if runs_triton(self):
            pad_mlp_hidden(self)  # e.g. a CPU-built engine moved to CUDA
        fold_block_norms(self)  # the folded weights follow the new dtype/device exactly
        pack_patch_embedding(self)
        self._bound_for = None  # new weights: bind the blocks' ops again
        return self

    def __getstate__(self):
        # the packed patch weight is an opaque oneDNN tensor (no storage to copy or pickle)
        return {**super().__getstate__(), "patch_packed": None}

    def __setstate__(self, state):
        super().__setstate__(state)
        pack_patch_embedding(self)  # a copy packs its own

    def extra_repr(self) -> str:
        return (f"backend={self.backend or 'auto'}, dtype={self.dtype}, device={self.device}, "
                f"cuda_graphs={self.cuda_graphs}")

    # ---- input checks -------------------------------------------------------------
    def check_images(self, images) -> None:
        """Raise ValueError/TypeError saying what this model expects."""
        spec = self.spec
        expected = f"(B, {spec.in_chans}, {spec.img_size[0]}, {spec.img_size[1]})"
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"expected a tensor of images {expected}, got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != spec.in_chans or \
                tuple(images.shape[2:]) != tuple(spec.img_size):
            raise InputError(f"this model expects images of shape {expected} ({spec.in_chans} channels, "
                             f"{spec.img_size[0]}x{spec.img_size[1]} pixels), got {tuple(images.shape)}; "
                             "resize/convert the images (dcvit_engine.data does this for image folders)")
        if images.shape[0] == 0:
            raise InputError("got an empty batch (0 images)")
        if images.dtype != self.dtype:
            hint = " (normalise integer images to float first)" if not images.is_floating_point() else ""
            raise InputError(f"this engine runs in {self.dtype} but the images are {images.dtype}; "
                             f"pass images.to({self.dtype}){hint}")
        if images.device != self.device:
            raise InputError(f"this engine runs on {self.device} but the images are on {images.device}; "
                             f"pass images.to('{self.device}')")

    # ---- forward ------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes), or pooled features when the model has no head."""
        self.check_images(images)
        if self.cuda_graphs and not torch.compiler.is_compiling():
            return self._replay(images)
        return self._run(images)

    def forward_eager(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens after the final norm, (B, N, D) with N after all merges (no input checks)."""
        spec, backend = self.spec, self.backend
        x = embed_patches(self, images)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        if self.prefix_tokens is not None:
            x = torch.cat([self.prefix_tokens.expand(x.shape[0], -1, -1), x], dim=1)
        if self.norm_pre_weight is not None:
            x = F.layer_norm(x, (spec.embed_dim,), self.norm_pre_weight, self.norm_pre_bias, spec.norm_eps)
        size = None  # tokens each token stands for, (B, N, 1); None until the first merge
        bound = self._bind_blocks()
        for block in self.blocks:
            metric = x  # a block without attention merges by the tokens themselves
            if block.has_attn:
                key_bias = size.log().squeeze(-1) if spec.prop_attn and size is not None else None
                x, metric = attention_residual(block, x, key_bias, block.merge is not None, backend, bound)
            if block.merge is not None:
                x, size = self._merge(block, x, metric, size)
            if block.has_mlp and bound:
                if block.mlp_call is None:
                    block.mlp_call = bind_mlp(block, x, spec.norm_eps, backend)
                x = block.mlp_call(x)
            elif block.has_mlp:
                x = ops.mlp_block(x, block.norm2_weight, block.norm2_bias, block.fc1_weight,
                                  block.fc1_bias, block.fc2_weight, block.fc2_bias,
                                  eps=spec.norm_eps, gamma=block.ls2, act=block.mlp_act,
                                  gated=block.mlp_gated, inner_norm_weight=block.mlp_norm_weight,
                                  inner_norm_bias=block.mlp_norm_bias, backend=backend,
                                  **_mlp_hints(block))
        if self.norm_weight is not None:
            x = F.layer_norm(x, (spec.embed_dim,), self.norm_weight, self.norm_bias, spec.norm_eps)
        return x

    def _bind_blocks(self) -> bool:
        """Whether the blocks run their ops' bound calls (bind_attention, bind_mlp): always, but
        under torch.compile (which traces the checked ops and leaves no per-call Python). The
        calls are bound again when the backend choice changes (Engine.backend, DCVIT_BACKEND)."""
        if torch.compiler.is_compiling():
            return False
        key = (self.backend, os.environ.get(ENV_VAR))
        if key != self._bound_for:
            for block in self.blocks:
                block.unbind()
            self._bound_for = key
        return True

    def _merge(self, block: EngineBlock, x, metric, size):
        return merge_tokens(self.spec, block.merge, block.grid_in, x, metric, size, backend=self.backend)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        def pair(name):
            weight = getattr(self, f"{name}_weight")
            return None if weight is None else (weight, getattr(self, f"{name}_bias"))

        attn_pool = {name.replace("__", "."): t for name, t in self.attn_pool.named_buffers()}
        return classify(self.spec, feats, head=pair("head"), head_dist=pair("head_dist"),
                        fc_norm=pair("fc_norm"), attn_pool=attn_pool or None)

    # ---- CUDA graphs ----------------------------------------------------------------
    def _replay(self, images: torch.Tensor) -> torch.Tensor:
        graph = self._graphs.get(images.shape[0])
        if graph is None:
            graph = self._capture(images)
            self._graphs[images.shape[0]] = graph
        graph.static_input.copy_(images)
        with torch.cuda.device(self.device):
            graph.graph.replay()
        # the static output is overwritten by the next replay: hand out a copy
        return graph.static_output.clone()

    def _capture(self, images: torch.Tensor) -> "_CapturedGraph":
        # Normal (not inference-mode) tensors, so that later calls outside
        # torch.inference_mode can still copy into the static input.
        with torch.inference_mode(False), torch.no_grad(), torch.cuda.device(self.device):
            static_input = images.detach().clone(memory_format=torch.contiguous_format)
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(GRAPH_WARMUP_RUNS):
                    self._run(static_input)
            torch.cuda.current_stream(self.device).wait_stream(side)
            if self._graph_pool is None:
                # one memory pool for all batch sizes: replays never overlap (same stream)
                self._graph_pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                static_output = self._run(static_input)
        return _CapturedGraph(graph, static_input, static_output)

    def clear_graphs(self) -> None:
        """Free the captured graphs (they are recaptured on the next call)."""
        self._graphs.clear()


@dataclass
class _CapturedGraph:
    graph: "torch.cuda.CUDAGraph"
    static_input: torch.Tensor
    static_output: torch.Tensor


def _resolve_device(device) -> torch.device:
    """devices.resolve_device, with CUDA's index made explicit (CUDA graphs are per device)."""
    device = resolve_device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _source_spec_state(source) -> tuple[ViTSpec, dict[str, torch.Tensor]]:
    if isinstance(source, ViTReference):
        return source.spec, dict(source.state_dict())
    if isinstance(source, (str, os.PathLike)):
        from .artifact import load  # layer 3, only needed for this source
        reference = load(source)
        return reference.spec, dict(reference.state_dict())
    if isinstance(source, nn.Module):
        return from_timm(source)  # raises UnsupportedModelError for anything else
    raise TypeError(f"build_engine takes a timm VisionTransformer, a ViTReference or an artifact "
                    f"folder path, got {type(source).__name__}")


def build_engine(model_or_artifact, backend: str | None = None, dtype=None, device=None, *,
                 cuda_graphs: bool = True, compile: bool = False) -> Engine:
    """An Engine for a timm ViT, a ViTReference or an artifact folder.

    backend: torch | cpu | cuda | triton for every op, or None/'auto' to let each op choose
    (DCVIT_BACKEND applies then). dtype: torch dtype or name ('fp16', 'bf16', ...), default
    bf16 on CUDA for fp32 models (a warning says so), else the model's. device: default the
    model's (artifacts load on the CPU). cuda_graphs:
    capture and replay a CUDA graph per batch size on CUDA devices. compile: run the forward
    through torch.compile(fullgraph=True) (inside the CUDA graph when both are on).
    """
    spec, state = _source_spec_state(model_or_artifact)
    requested_backend(backend)  # rejects unknown backend names with the list of choices
    reference_tensor = state["patch_embed.proj.weight"]
    device = _resolve_device(device if device is not None else reference_tensor.device)
    if device.type == "meta":
        raise InputError("the model's weights are on the meta device; load real weights first")
    if dtype is not None:
        dtype = parse_dtype(dtype)
    else:
        dtype, note = default_dtype(reference_tensor.dtype, device)
        if note:
            warnings.warn(note, stacklevel=2)
    return Engine(spec, state, backend=None if backend == "auto" else backend, dtype=dtype,
                  device=device, cuda_graphs=cuda_graphs, compile=compile).eval()
