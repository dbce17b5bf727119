"""Weight-magnitude importance scores of neurons, heads and channels, shared by the methods
that prune them (CAIT initialises its gates from them, UVC ranks its groups by them). Each
takes a ViTReference and reads only its weights.

- neuron_scores: an MLP hidden neuron, |fc1 row(s)| * |fc2 column| (CAIT);
- channel_scores: a q/k channel |q row| * |k row|, a v channel |v row| * |proj column|,
  summed over heads (CAIT's channels shared by all heads);
- group_scores: a head, its channels and the MLP neurons by the squared norms of the proj
  and fc2 columns they feed (UVC).
"""
from __future__ import annotations

from ..reference import ViTReference


def neuron_scores(model: ViTReference):
    """Per block with an MLP: |fc1 row| |fc2 column| of every hidden neuron (None without); a
    gated MLP's neuron owns two fc1 rows (gate i, value i): their norm taken together."""
    return [block.mlp.fc1.weight.detach().view(1 + spec.mlp_gated, spec.mlp_hidden, -1).norm(dim=(0, 2))
            * block.mlp.fc2.weight.detach().norm(dim=0)
            if spec.mlp_hidden else None for block, spec in zip(model.blocks, model.spec.blocks)]


def channel_scores(model: ViTReference):
    """Per block with attention: (q/k scores (d,), v scores (d,)), each summed over heads:
    |q row| |k row| for a q/k channel, |v row| |proj column| for a v channel."""
    out = []
    for block, spec in zip(model.blocks, model.spec.blocks):
        if spec.attn is None:
            out.append(None)
            continue
        heads, d, total = spec.attn.num_heads, spec.attn.qk_dims[0], spec.attn.qk_total
        rows = block.attn.qkv.weight.detach().norm(dim=1)
        q, k, v = (rows[:total].view(heads, d), rows[total:2 * total].view(heads, d),
                   rows[2 * total:].view(heads, d))
        proj = block.attn.proj.weight.detach().norm(dim=0).view(heads, d)
        out.append(((q * k).sum(0), (v * proj).sum(0)))
    return out


def group_scores(model: ViTReference, heads: int, head_dim: int):
    """Per block: head scores (H,), channel scores (H, d), neuron scores (hidden,)."""
    out = []
    for block in model.blocks:
        cols = block.attn.proj.weight.detach().pow(2).sum(0).view(heads, head_dim)
        out.append((cols.sum(1), cols, block.mlp.fc2.weight.detach().pow(2).sum(0)))
    return out
