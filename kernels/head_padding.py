"""Attention heads padded with zero weights to widths the kernels tile without masks.

build_engine pads each kept head's q/k width and v width up to a multiple of 16 (the Triton
attention kernel then loads whole 16-byte vectors, pipelines them with cp.async, and tiles a
48-wide head as 32 + 16 columns; the C++ impls batch heads of one padded width into one
call). Exact: a zero q/k column adds nothing to q k^T, a zero v column gives a zero context
column, and the proj columns it meets are zero too. The spec, `dcvit info` and the MACs
keep the real widths; only the engine's weights and the widths it passes to the op grow.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

HEAD_WIDTH_MULTIPLE = 16


def padded_width(width: int, multiple: int = HEAD_WIDTH_MULTIPLE) -> int:
    return -(-width // multiple) * multiple


@dataclass
class PaddedHeads:
    """A block's attention weights with every head padded (see the module docstring)."""

    qk_dims: list[int]
    v_dims: list[int]
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    proj_weight: torch.Tensor
    key_columns: torch.Tensor  # (sum(real qk_dims),) int64: the real columns of the padded keys


def _row_map(dims: list[int], padded: list[int], src_start: int, dst_start: int):
    """(source rows, destination rows) of each head's real rows in the packed layout."""
    src, dst = [], []
    s, d = src_start, dst_start
    for real, wide in zip(dims, padded):
        src.extend(range(s, s + real))
        dst.extend(range(d, d + real))
        s, d = s + real, d + wide
    return src, dst


def pad_heads(qk_dims, v_dims, qkv_weight, qkv_bias, proj_weight,
              multiple: int = HEAD_WIDTH_MULTIPLE) -> PaddedHeads:
    """qkv rows packed [q_0|q_1|..|k_0|k_1|..|v_0|v_1|..] (qkv_weight (rows, D), qkv_bias
    (rows,) or None) and proj_weight (D, sum(v_dims)), with zero rows / columns inserted so
    that every head's q/k and v widths are multiples of `multiple`."""
    qk_pad = [padded_width(w, multiple) for w in qk_dims]
    v_pad = [padded_width(w, multiple) for w in v_dims]
    qk_real, qk_wide = sum(qk_dims), sum(qk_pad)
    src, dst = [], []
    for part, (dims, padded) in enumerate(((qk_dims, qk_pad), (qk_dims, qk_pad), (v_dims, v_pad))):
        s, d = _row_map(dims, padded, part * qk_real, part * qk_wide)
        src.extend(s)
        dst.extend(d)
    src_idx = torch.tensor(src, device=qkv_weight.device)
    dst_idx = torch.tensor(dst, device=qkv_weight.device)
    rows = 2 * qk_wide + sum(v_pad)
    weight = qkv_weight.new_zeros(rows, qkv_weight.shape[1])
    weight[dst_idx] = qkv_weight[src_idx]
    bias = None
    if qkv_bias is not None:
        bias = qkv_bias.new_zeros(rows)
        bias[dst_idx] = qkv_bias[src_idx]
    v_src, v_dst = _row_map(v_dims, v_pad, 0, 0)
    proj = proj_weight.new_zeros(proj_weight.shape[0], sum(v_pad))
    proj[:, torch.tensor(v_dst, device=proj.device)] = proj_weight[:, torch.tensor(v_src, device=proj.device)]
    _, key_cols = _row_map(qk_dims, qk_pad, 0, 0)
    return PaddedHeads(qk_pad, v_pad, weight, bias, proj,
                       torch.tensor(key_cols, dtype=torch.int64, device=qkv_weight.device))
