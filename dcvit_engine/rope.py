"""Rotary position embedding tables of a spec, computed as timm computes them.

`rope_tables(spec)` is the one place that turns a spec's RopeSpec into sin/cos tables: the
reference module rotates with it, and the engine's attention op takes its "half" layout.

Conventions (timm's `apply_rot_embed`): a head of width d is rotated in pairs of channels
sharing one angle. In the "half" layout channel i < d/2 pairs with i + d/2 and
    out = x * cos + cat(-x[d/2:], x[:d/2]) * sin,
in the "interleaved" layout channel 2i pairs with 2i + 1 and
    out = x * cos + (-x1, x0, -x3, x2, ...) * sin.
An interleaved model runs exactly in the half layout once every head's q and k channels are
reordered by `half_rotation_order` (channel 2i -> i, 2i + 1 -> i + d/2): q.k is unchanged by a
permutation applied to both, and the rotation then pairs the same channels with the same angles.

Precision: the frequencies and grid coordinates are timm's float32 values (they are constants
of the model, as its weights are); the angle products and sin/cos are taken in the table's dtype.
"""
from __future__ import annotations

import math

import torch

from .spec import RopeSpec, ViTSpec

LAYOUTS = ("half", "spec")


def _axis_coords(rope: RopeSpec, grid: tuple[int, int]) -> torch.Tensor:
    """(rows, cols, 2) float32 coordinates per patch, channel order per grid_indexing."""
    shape = list(grid)
    ref = list(rope.ref_feat_shape) if rope.ref_feat_shape is not None else None
    if rope.grid_indexing == "xy":  # timm swaps the axes, meshgrid 'xy' swaps them back spatially
        shape = shape[::-1]
        ref = ref[::-1] if ref is not None else None
    if rope.kind in ("cat", "mixed"):
        axes = [torch.arange(s, dtype=torch.int64).to(torch.float32) + rope.grid_offset for s in shape]
        if ref is not None:  # EVA: positions rescaled so the grid spans the pretraining grid
            axes = [t / s * r for t, s, r in zip(axes, shape, ref)]
    else:  # dinov3: 0.5-centred positions normalised to [0, 1], mapped to [-1, 1] below
        if rope.normalize_coords == "separate":
            denom = [float(s) for s in shape]
        else:
            pick = max if rope.normalize_coords == "max" else min
            denom = [float(pick(shape))] * 2
        axes = [(torch.arange(0.5, s, dtype=torch.float32) + rope.grid_offset) / d
                for s, d in zip(shape, denom)]
    coords = torch.stack(torch.meshgrid(axes, indexing=rope.grid_indexing), dim=-1).to(torch.float32)
    return 2.0 * coords - 1.0 if rope.kind == "dinov3" else coords


def _frequencies(rope: RopeSpec) -> torch.Tensor:
    """(dim // 4,) float32: cat's inverse-frequency bands, or dinov3's periods."""
    bands = rope.dim // 4
    if rope.kind == "cat":
        exponent = torch.arange(0, bands, 1, dtype=torch.int64).to(torch.float32) / bands
        return 1.0 / (rope.temperature ** exponent)
    if rope.min_period is not None:
        exponent = torch.linspace(0, 1, bands, dtype=torch.float32)
        return rope.min_period * ((rope.max_period / rope.min_period) ** exponent)
    exponent = 2.0 * torch.arange(bands, dtype=torch.float32) / (rope.dim // 2)
    return rope.temperature ** exponent


def rope_angles(rope: RopeSpec, grid: tuple[int, int], dtype=torch.float64, freqs=None) -> torch.Tensor:
    """(rows * cols, dim // 2) rotation angles, patches row-major, the angle of pair i in
    column i (axis 0's bands, then axis 1's). Mixed: (heads, rows * cols, dim // 2) from a
    block's learned freqs (2, heads, dim // 2), x * freqs[0] + y * freqs[1]."""
    coords = _axis_coords(rope, grid).flatten(0, 1).to(dtype)       # (N, 2)
    if rope.kind == "mixed":
        if freqs is None:
            raise ValueError("mixed RoPE needs the block's frequencies (blocks.i.attn.rope_freqs)")
        freqs = freqs.to(device=coords.device, dtype=dtype)
        return coords[:, 0, None] * freqs[0][:, None, :] + coords[:, 1, None] * freqs[1][:, None, :]
    freqs = _frequencies(rope).to(dtype)                           # (dim // 4,)
    if rope.kind == "cat":
        angles = coords[:, :, None] * freqs
    else:
        angles = 2 * math.pi * coords[:, :, None] / freqs[None, None, :]
    return angles.flatten(1)


def _layout(values: torch.Tensor, rotate_half: bool) -> torch.Tensor:
    """Per-pair values (N, d/2) -> per-channel (N, d) in the half or interleaved layout."""
    if rotate_half:
        return torch.cat([values, values], dim=-1)
    return torch.stack([values, values], dim=-1).flatten(-2)  # [f0, f0, f1, f1, ...]


def rope_tables(spec: ViTSpec, *, layout: str = "half", dtype=torch.float32, device=None, freqs=None):
    """(sin, cos), each (num_patches, rope.dim): the table of every patch token and every q/k
    channel of one head (all heads share it; prefix tokens are not rotated). layout "half":
    the op contract (pair i, i + d/2), for q/k channels ordered by half_rotation_order;
    "spec": the model's own layout (what timm and the reference module apply).
    Mixed RoPE: per block and head, (heads, num_patches, rope.dim) from that block's
    `freqs` (blocks.i.attn.rope_freqs); timm takes its angles in float32 at every dtype."""
    if spec.rope is None:
        raise ValueError("this spec has no rotary position embedding (spec.rope is None)")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    # below float32 (bf16, fp16) the angles are still taken in float32, as timm does
    compute = torch.float64 if dtype == torch.float64 and spec.rope.kind != "mixed" else torch.float32
    angles = rope_angles(spec.rope, spec.grid, dtype=compute, freqs=freqs)
    rotate_half = True if layout == "half" else spec.rope.rotate_half
    return tuple(_layout(f(angles), rotate_half).to(dtype=dtype, device=device)
                 for f in (torch.sin, torch.cos))


def half_rotation_order(spec: ViTSpec) -> torch.Tensor:
    """(rope.dim,) channel order within each q/k head for the half layout: new channel j takes
    old channel order[j]. Identity for a half-layout model; for an interleaved one 2i -> i and
    2i + 1 -> i + d/2. Apply it to the q and k rows of qkv (and q_norm/k_norm weights)."""
    if spec.rope is None:
        raise ValueError("this spec has no rotary position embedding (spec.rope is None)")
    d = spec.rope.dim
    if spec.rope.rotate_half:
        return torch.arange(d)
    return torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, rotate_half: bool) -> torch.Tensor:
    """Rotate x (..., N, d) by tables (N, d) in the given layout (timm's apply_rot_embed)."""
    if rotate_half:
        x1, x2 = x.chunk(2, dim=-1)
        turned = torch.cat([-x2, x1], dim=-1)
    else:
        turned = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape(x.shape)
    return x * cos + turned * sin
