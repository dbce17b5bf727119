"""Attention heads padded with zero weights to widths the kernels tile without masks.

build_engine pads each kept head's q/k width and v width up to a multiple of 16 once (the
Triton attention kernel then loads whole 16-byte vectors, pipelines them with cp.async, and
tiles a 48-wide head as 32 + 16 columns; the C++ impls batch heads of one padded width into
one call); the Triton attention op pads per call when given other widths. Exact: a zero q/k
column adds nothing to q k^T, a zero v column gives a zero context column, and the proj
columns it meets are zero too. The spec, `dcvit info` and the MACs keep the real widths;
only the engine's weights and the widths it passes to the op grow.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


def _pad_chunks(tensor, dims, padded, dim):
    # Each head's slice along `dim`, zero-padded at its end; device ops only (no host-to-
    # device copy), so a CUDA graph can capture it.
    chunks = tensor.split(dims, dim=dim)
    pad = [0, 0] * (tensor.dim() - 1 - dim % tensor.dim())
    return [F.pad(c, pad + [0, wide - real]) if wide > real else c
            for c, real, wide in zip(chunks, dims, padded)]


def pad_head_weights(qk_dims, v_dims, qkv_weight, qkv_bias, proj_weight,
                     multiple: int = HEAD_WIDTH_MULTIPLE):
    """(padded qk_dims, padded v_dims, qkv_weight, qkv_bias, proj_weight): qkv rows packed
    [q_0|q_1|..|k_0|k_1|..|v_0|v_1|..] (qkv_weight (rows, D), qkv_bias (rows,) or None) and
    proj_weight (D, sum(v_dims)) with zero rows / columns after each head's own, so that
    every head's q/k and v widths are multiples of `multiple`."""
    qk_pad = [padded_width(w, multiple) for w in qk_dims]
    v_pad = [padded_width(w, multiple) for w in v_dims]
    dims, padded = list(qk_dims) * 2 + list(v_dims), qk_pad * 2 + v_pad
    weight = torch.cat(_pad_chunks(qkv_weight, dims, padded, 0))
    bias = None if qkv_bias is None else torch.cat(_pad_chunks(qkv_bias, dims, padded, 0))
    proj = torch.cat(_pad_chunks(proj_weight, list(v_dims), v_pad, 1), dim=1)
    return qk_pad, v_pad, weight, bias, proj


def pad_head_vector(vector, dims, padded):
    """A per-channel vector over heads of widths `dims` (e.g. the inner norm's weight) with
    zeros after each head's channels, for heads padded to `padded`."""
    return torch.cat(_pad_chunks(vector, list(dims), list(padded), 0))


def pad_heads(qk_dims, v_dims, qkv_weight, qkv_bias, proj_weight,
              multiple: int = HEAD_WIDTH_MULTIPLE) -> PaddedHeads:
    """pad_head_weights as one record (build_engine keeps it)."""
    return PaddedHeads(*pad_head_weights(qk_dims, v_dims, qkv_weight, qkv_bias, proj_weight, multiple))
