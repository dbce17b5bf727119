"""Channel / head / neuron / block masks, the masked model, and the physically smaller model.

A structured-pruning method (UVC, CAIT) learns which parts of each block to keep and
expresses that as multiplicative masks (BlockMasks). `apply_masks` runs a reference module
with the masks (forward hooks, so the masks can be soft and carry gradients while they are
learned); `slice_model` turns hard masks into a new spec with smaller widths and the weights
that compute exactly what the masked model computes (mask values are folded into the kept
rows / columns, zeros are cut away).

Masked-model semantics (the sliced model reproduces these exactly):
  - qkv: the qkv output channels (packed [q_0..|k_0..|v_0..]) are multiplied by `qkv`;
  - proj_in: the projection input (the v channels, head order) is multiplied by `proj_in`;
  - hidden: the MLP hidden activations (fc2 input) are multiplied by `hidden`; in a gated MLP
    a hidden neuron is the product act(gate_i) * value_i, so a value row and its gate row are
    kept or cut together;
  - inner norms (timm attn.norm over the v channels, mlp.norm over the hidden neurons): the
    norm's mean and variance are taken over the channels whose mask is not zero, as the
    sliced model's narrower norm does (soft masks: every channel, as the teacher);
  - a head whose v channels are all masked (qkv v part times proj_in) is removed; a
    branch left with no head (attention) or no neuron (MLP) is removed with its output
    bias, as the sliced model has no such branch at all;
  - keep_block = False removes both branches (the block becomes the identity).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..macs import attention_macs, block_macs, count_macs, mlp_macs
from ..reference import ViTReference
from ..spec import AttentionSpec, BlockSpec, ViTSpec


@dataclass
class BlockMasks:
    """Multiplicative masks of one block; None means all ones (nothing masked)."""
    qkv: torch.Tensor | None = None      # (qkv_out,)
    proj_in: torch.Tensor | None = None  # (v_total,)
    hidden: torch.Tensor | None = None   # (mlp_hidden,)
    keep_block: bool = True


@dataclass(frozen=True)
class WidthCosts:
    """MACs of a spec as a linear function of its widths, read off dcvit_engine.macs.

    total = fixed + sum_i (qk[i] * qk_total_i + v[i] * v_total_i + neuron[i] * hidden_i),
    with the token counts of the spec's own merge schedule. Pruning methods evaluate it
    on relaxed (real, differentiable) widths to steer toward a MACs budget.
    """
    fixed: int              # patch embedding + head(s)
    qk: list[int]           # per block: MACs of one q/k channel (its q row, k row, QK^T share)
    v: list[int]            # per block: MACs of one v channel (v row, A.V share, proj column)
    neuron: list[int]       # per block: MACs of one MLP hidden neuron

    def total(self, qk_total, v_total, hidden):
        """MACs for per-block widths (sequences of numbers or tensors)."""
        out = self.fixed
        for c_qk, c_v, c_n, q, v, h in zip(self.qk, self.v, self.neuron, qk_total, v_total, hidden):
            out = out + c_qk * q + c_v * v + c_n * h
        return out


def width_costs(spec: ViTSpec) -> WidthCosts:
    """The linear MACs model of `spec` (exact: count_macs is linear in the widths)."""
    report = count_macs(spec)
    dim = spec.embed_dim
    qk, v, neuron = [], [], []
    for i in range(spec.depth):
        bm = block_macs(spec, i)

        def attn(q: int, w: int) -> int:
            return attention_macs(AttentionSpec(qk_dims=[q], v_dims=[w], scale=1.0), dim, bm.tokens)
        qk.append(attn(2, 1) - attn(1, 1))
        v.append(attn(1, 2) - attn(1, 1))
        gated = spec.blocks[i].mlp_gated
        neuron.append(mlp_macs(dim, 1, bm.mlp_tokens, gated))
        if attn(1, 1) != qk[-1] + v[-1] or mlp_macs(dim, 2, bm.mlp_tokens, gated) != 2 * neuron[-1]:
            raise AssertionError("dcvit_engine.macs is no longer linear in the widths; "
                                 "update width_costs")
    pool = report.attn_pool.total if report.attn_pool is not None else 0  # never pruned
    return WidthCosts(fixed=report.patch_embed + report.head + pool, qk=qk, v=v, neuron=neuron)


def head_rows(attn: AttentionSpec) -> list[tuple[slice, slice, slice]]:
    """Per head: its q rows, k rows and v rows in the packed qkv (v also indexes proj columns
    once 2 * qk_total is subtracted)."""
    qk_total = attn.qk_total
    rows, q0, v0 = [], 0, 0
    for dq, dv in zip(attn.qk_dims, attn.v_dims):
        rows.append((slice(q0, q0 + dq), slice(qk_total + q0, qk_total + q0 + dq),
                     slice(2 * qk_total + v0, 2 * qk_total + v0 + dv)))
        q0, v0 = q0 + dq, v0 + dv
    return rows


def attention_masks(attn: AttentionSpec, qk_keep, v_keep) -> BlockMasks:
    """Masks of an attention from per-head keep vectors: qk_keep[h] (qk_dims[h],) applies to
    head h's q and k channels, v_keep[h] (v_dims[h],) to its v channels / projection input.
    A head whose v_keep is all zero is removed."""
    if len(qk_keep) != attn.num_heads or len(v_keep) != attn.num_heads:
        raise InputError(f"need one q/k and one v keep vector per head ({attn.num_heads} heads), "
                         f"got {len(qk_keep)} and {len(v_keep)}")
    for h, (q, v, dq, dv) in enumerate(zip(qk_keep, v_keep, attn.qk_dims, attn.v_dims)):
        if q.shape != (dq,) or v.shape != (dv,):
            raise InputError(f"head {h}: keep vectors of shape {tuple(q.shape)} / {tuple(v.shape)}, "
                             f"expected ({dq},) / ({dv},)")
    qk = torch.cat(list(qk_keep))
    v = torch.cat(list(v_keep))
    return BlockMasks(qkv=torch.cat([qk, qk, torch.ones_like(v)]), proj_in=v)


def _check_masks(spec: ViTSpec, masks: list[BlockMasks]) -> None:
    if len(masks) != spec.depth:
        raise InputError(f"need one BlockMasks per block ({spec.depth}), got {len(masks)}")
    for i, (block, m) in enumerate(zip(spec.blocks, masks)):
        expected = {"qkv": block.attn.qkv_out if block.attn else None,
                    "proj_in": block.attn.v_total if block.attn else None,
                    "hidden": block.mlp_hidden or None}
        for name, size in expected.items():
            tensor = getattr(m, name)
            if tensor is None:
                continue
            if size is None:
                raise InputError(f"block {i}: a {name} mask was given but the block has no such branch")
            if tensor.shape != (size,):
                raise InputError(f"block {i}: {name} mask has shape {tuple(tensor.shape)}, "
                                 f"expected ({size},)")
        whole = qk_whole_reason(spec, i)
        if whole and m.qkv is not None:
            live_v, shift = _live_v(block.attn, m), 2 * block.attn.qk_total
            for q_rows, k_rows, v_rows in head_rows(block.attn):  # a removed head may be masked
                head_kept = bool((live_v[v_rows.start - shift:v_rows.stop - shift] != 0).any())
                if head_kept and not bool((m.qkv[q_rows] == 1).all() and (m.qkv[k_rows] == 1).all()):
                    raise InputError(f"block {i}: q/k channels cannot be masked under {whole}; "
                                     "mask heads or v channels only")


def qk_whole_reason(spec: ViTSpec, i: int) -> str | None:
    """Why block i's q/k heads must keep their full width, or None: q/k-norm normalises over
    the whole head width with one shared weight; RoPE rotates channel pairs spanning the whole
    head (i with i + dim/2, or 2i with 2i+1) at frequencies set by the position in the head."""
    attn = spec.blocks[i].attn
    if attn is None:
        return None
    if attn.qk_norm:
        return "qk_norm (the norm spans the full head width)"
    if spec.rope is not None:
        return "RoPE (rotation pairs and their frequencies span the full head width)"
    return None


def _live_v(attn: AttentionSpec, m: BlockMasks) -> torch.Tensor:
    """Effective multiplier of each v channel: its qkv mask times its projection-input mask."""
    v = torch.ones(attn.v_total) if m.qkv is None else m.qkv[2 * attn.qk_total:].detach().cpu()
    if m.proj_in is not None:
        v = v * m.proj_in.detach().cpu()
    return v


def _branches_alive(spec: ViTSpec, i: int, m: BlockMasks) -> tuple[bool, bool]:
    block = spec.blocks[i]
    attn = block.attn is not None and m.keep_block and bool((_live_v(block.attn, m) != 0).any())
    mlp = block.mlp_hidden > 0 and m.keep_block and (m.hidden is None or bool((m.hidden != 0).any()))
    return attn, mlp


@contextlib.contextmanager
def apply_masks(model: ViTReference, masks: list[BlockMasks]):
    """Run `model` as the masked model (see the module docstring) inside the `with` block."""
    _check_masks(model.spec, masks)
    handles = []

    def scale_output(mask_or_zero):
        return lambda module, args, out: out * mask_or_zero

    def scale_input(mask):
        return lambda module, args: (args[0] * mask,)

    def norm_over_kept(mask):
        kept = (mask.detach() != 0).nonzero().flatten()

        def hook(module, args, out):
            if kept.numel() == mask.numel():
                return out
            inner = F.layer_norm(args[0][..., kept], (kept.numel(),), module.weight[kept],
                                 module.bias[kept], module.eps)
            return out.index_copy(-1, kept.to(out.device), inner)
        return hook

    try:
        for i, (block, m) in enumerate(zip(model.blocks, masks)):
            attn_alive, mlp_alive = _branches_alive(model.spec, i, m)
            if block.attn is not None:
                if m.qkv is not None:
                    handles.append(block.attn.qkv.register_forward_hook(scale_output(m.qkv)))
                if m.proj_in is not None:
                    handles.append(block.attn.proj.register_forward_pre_hook(scale_input(m.proj_in)))
                if block.attn.norm is not None and attn_alive:
                    live = _live_v(model.spec.blocks[i].attn, m).to(block.attn.norm.weight.device)
                    handles.append(block.attn.norm.register_forward_hook(norm_over_kept(live)))
                if not attn_alive:
                    handles.append(block.attn.proj.register_forward_hook(scale_output(0.0)))
            if block.mlp is not None:
                if m.hidden is not None:
                    handles.append(block.mlp.fc2.register_forward_pre_hook(scale_input(m.hidden)))
                    if block.mlp.norm is not None and mlp_alive:
                        handles.append(block.mlp.norm.register_forward_hook(norm_over_kept(m.hidden)))
                if not mlp_alive:
                    handles.append(block.mlp.fc2.register_forward_hook(scale_output(0.0)))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _sliced_attention(state: dict, prefix: str, attn: AttentionSpec, m: BlockMasks):
    """(new AttentionSpec, new tensors) of one attention, masks folded into the kept rows/columns."""
    qkv_w, proj_w = state[prefix + "attn.qkv.weight"], state[prefix + "attn.proj.weight"]
    qkv_b = state.get(prefix + "attn.qkv.bias")
    device = qkv_w.device
    qkv_mask = torch.ones(attn.qkv_out, dtype=qkv_w.dtype) if m.qkv is None \
        else m.qkv.detach().to("cpu", qkv_w.dtype)
    proj_mask = torch.ones(attn.v_total, dtype=qkv_w.dtype) if m.proj_in is None \
        else m.proj_in.detach().to("cpu", qkv_w.dtype)
    live_v = _live_v(attn, m)
    q_rows, k_rows, v_rows, v_cols, qk_dims, v_dims, heads = [], [], [], [], [], [], []
    for head, (q, k, v) in enumerate(head_rows(attn)):
        cols = torch.arange(v.start, v.stop) - 2 * attn.qk_total
        kept_v = cols[live_v[cols] != 0]
        if kept_v.numel() == 0:
            continue  # head removed
        q_idx = torch.arange(q.start, q.stop)
        kept_qk = (qkv_mask[q_idx] * qkv_mask[q_idx + attn.qk_total] != 0).nonzero().flatten()
        if kept_qk.numel() == 0:
            # every logit is 0 -> uniform attention; one channel, zeroed by the folded mask, keeps that
            kept_qk = torch.zeros(1, dtype=torch.long)
        q_rows.append(q.start + kept_qk)
        k_rows.append(k.start + kept_qk)
        v_rows.append(2 * attn.qk_total + kept_v)
        v_cols.append(kept_v)
        qk_dims.append(kept_qk.numel())
        v_dims.append(kept_v.numel())
        heads.append(head)
    rows = torch.cat(q_rows + k_rows + v_rows)
    cols = torch.cat(v_cols)
    # q, k and v rows carry their own mask (exact: A.V is linear in V, and an inner norm
    # then sees the masked v as the masked model does); proj's columns the projection-input mask
    row_scale = qkv_mask[rows]
    col_scale = proj_mask[cols]
    rows_d, cols_d = rows.to(device), cols.to(device)
    tensors = {prefix + "attn.qkv.weight": qkv_w[rows_d] * row_scale.to(device)[:, None],
               prefix + "attn.proj.weight": proj_w[:, cols_d] * col_scale.to(device)[None, :]}
    if qkv_b is not None:
        tensors[prefix + "attn.qkv.bias"] = qkv_b[rows_d] * row_scale.to(device)
    if attn.inner_norm:  # LayerNorm over the v channels: keeps the kept ones' weights
        for name in ("weight", "bias"):
            tensors[prefix + f"attn.norm.{name}"] = state[prefix + f"attn.norm.{name}"][cols_d]
    if prefix + "attn.rope_freqs" in state:  # mixed RoPE: per-head frequencies of the kept heads
        tensors[prefix + "attn.rope_freqs"] = state[prefix + "attn.rope_freqs"][:, heads]
    new_attn = dataclasses.replace(attn, qk_dims=qk_dims, v_dims=v_dims)
    return new_attn, tensors


def _sliced_mlp(state: dict, prefix: str, block: BlockSpec, m: BlockMasks):
    fc1_w = state[prefix + "mlp.fc1.weight"]
    hidden = block.mlp_hidden
    mask = torch.ones(hidden, dtype=fc1_w.dtype) if m.hidden is None \
        else m.hidden.detach().to("cpu", fc1_w.dtype)
    kept = (mask != 0).nonzero().flatten()
    tensors = mlp_neuron_tensors(state, prefix, block, kept)
    fc2 = prefix + "mlp.fc2.weight"
    tensors[fc2] = tensors[fc2] * mask[kept].to(fc1_w.device)[None, :]
    return kept.numel(), tensors


def mlp_neuron_tensors(state: dict, prefix: str, block: BlockSpec, kept: torch.Tensor) -> dict:
    """The MLP tensors of block `prefix` reduced to the hidden neurons `kept`: fc1 rows (a gated
    MLP's gate row i and value row mlp_hidden + i together), the inner norm's entries and fc2
    columns; fc2's bias as it is."""
    fc1_w = state[prefix + "mlp.fc1.weight"]
    idx = kept.to(fc1_w.device)
    rows = torch.cat([idx, idx + block.mlp_hidden]) if block.mlp_gated else idx
    tensors = {prefix + "mlp.fc1.weight": fc1_w[rows],
               prefix + "mlp.fc1.bias": state[prefix + "mlp.fc1.bias"][rows],
               prefix + "mlp.fc2.weight": state[prefix + "mlp.fc2.weight"][:, idx]}
    if block.mlp_inner_norm:
        for name in ("weight", "bias"):
            tensors[prefix + f"mlp.norm.{name}"] = state[prefix + f"mlp.norm.{name}"][idx]
    return tensors


def _check_merge_metric_kept(i: int, attn: AttentionSpec, m: BlockMasks, new_attn) -> None:
    """A merging block compares tokens by its keys averaged over heads: slicing keeps that
    metric only if every head stays and the same q/k channel positions stay in each head."""
    if new_attn is None or new_attn.num_heads != attn.num_heads:
        raise InputError(f"block {i} merges tokens by its attention keys; none of its heads "
                         "can be removed (prune channels there, or heads elsewhere)")
    if m.qkv is None:
        return
    kept = m.qkv[:attn.qk_total] * m.qkv[attn.qk_total:2 * attn.qk_total] != 0
    patterns = {tuple(kept[q].tolist()) for q, _, _ in head_rows(attn)}
    if len(patterns) > 1:
        raise InputError(f"block {i} merges tokens by its keys averaged over heads; its q/k channel "
                         "masks must be the same in every head (one mask shared by all heads)")


_ATTN_PARTS = ("norm1.", "attn.", "ls1.")
_MLP_PARTS = ("norm2.", "mlp.", "ls2.")


def slice_model(model: ViTReference, masks: list[BlockMasks]) -> ViTReference:
    """A new reference module with a smaller spec computing what `model` computes under
    `apply_masks(model, masks)`; `model` is untouched. Soft (non-0/1) mask values are folded
    into the weights, so only the block gates must be hard."""
    spec = model.spec
    _check_masks(spec, masks)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    tensors = {k: v for k, v in state.items() if not k.startswith("blocks.")}
    blocks = []
    for i, (block, m) in enumerate(zip(spec.blocks, masks)):
        prefix = f"blocks.{i}."
        attn_alive, mlp_alive = _branches_alive(spec, i, m)
        own = {k: v for k, v in state.items() if k.startswith(prefix)}
        new_attn, hidden = None, 0
        if attn_alive:  # norms, layer scale, proj bias, q/k norms as they are; qkv and proj sliced
            tensors.update({k: v for k, v in own.items() if k[len(prefix):].startswith(_ATTN_PARTS)})
            new_attn, attn_tensors = _sliced_attention(state, prefix, block.attn, m)
            tensors.update(attn_tensors)
        if block.merge is not None and block.attn is not None:
            _check_merge_metric_kept(i, block.attn, m, new_attn)
        if mlp_alive:
            tensors.update({k: v for k, v in own.items() if k[len(prefix):].startswith(_MLP_PARTS)})
            hidden, mlp_tensors = _sliced_mlp(state, prefix, block, m)
            tensors.update(mlp_tensors)
        blocks.append(dataclasses.replace(block, attn=new_attn, mlp_hidden=hidden,
                                          merge=copy.deepcopy(block.merge)))
    new_spec = copy.deepcopy(spec)
    new_spec.blocks = blocks
    new_spec.validate()
    student = ViTReference.from_state(new_spec, {k: v.clone().contiguous() for k, v in tensors.items()})
    return student.train(model.training)
