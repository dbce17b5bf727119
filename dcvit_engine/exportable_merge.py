"""ToMe's bipartite merge written with ops that torch.export and ONNX both take.

The reference module merges with this function, so the module that `dcvit export`
traces is the module every backend is tested against (one implementation, not two).
It computes what `kernels.token_merge.tome_merge_ref` computes (sharing its first steps,
scores and merge sums), but:

- the stable descending argsort of the edge scores (ONNX has no stable sort, and the
  legacy exporter refuses sort with an out parameter) is a rank from pairwise comparisons,
  rank_i = #{j : v_j > v_i} + #{j < i : v_j == v_i}, inverted with one scatter. That is
  exactly the stable order, ties included, at O(Na^2) comparisons per image: ~100^2 for a
  224px ViT-B/16, negligible beside attention;
- unmerged A tokens are put back in index order (with a class token, as official ToMe)
  by their rank among the unmerged tokens (cumsum) instead of a second sort;
- the protected class / distillation token is masked with masked_fill of a constant mask,
  not an in-place index assignment;
- every gather / scatter has a shape fixed by (tokens, r), so a fixed image size gives a
  fixed token count through every block, whatever the batch size.
"""
from __future__ import annotations

import torch

from .kernels.token_merge import tome_merge_sum, tome_scores, tome_start


def stable_argsort_descending(values: torch.Tensor) -> torch.Tensor:
    """The stable descending order of (B, N) values with NaN last (as the merge ops sort):
    (-values).argsort(dim=-1, stable=True). A permutation whatever the values, so every
    gather and scatter built on it stays in bounds."""
    n = values.shape[-1]
    index = torch.arange(n, device=values.device)
    v_i, v_j = values.unsqueeze(-1), values.unsqueeze(-2)             # [b, i, j]
    nan_i, nan_j = v_i.isnan(), v_j.isnan()
    higher = ~nan_j & (nan_i | (v_j > v_i))                            # j sorts before i
    same = (v_j == v_i) | (nan_j & nan_i)
    rank = (higher | (same & (index < index.unsqueeze(-1)))).sum(dim=-1)
    return _invert(rank)


def _invert(rank: torch.Tensor) -> torch.Tensor:
    """order with order[b, rank[b, i]] = i (rank is a permutation of 0..N-1 per row)."""
    positions = torch.arange(rank.shape[-1], device=rank.device).expand_as(rank)
    return torch.zeros_like(rank).scatter(-1, rank, positions)


def _merge_plan(metric: torch.Tensor, r: int, class_token: bool, distill_token: bool):
    """Indices (B, k, 1) of the unmerged A tokens (output order), the merged A tokens and
    their B destinations, all within A = even tokens, B = odd tokens."""
    scores = tome_scores(metric)
    num_a, num_b = scores.shape[-2:]
    protected = torch.zeros(num_a, num_b, dtype=torch.bool, device=scores.device)
    if class_token:  # the class token (A's first) is never merged away
        protected = protected | (torch.arange(num_a, device=scores.device) == 0).unsqueeze(-1)
    if distill_token:  # the distillation token (B's first) never receives a merge
        protected = protected | (torch.arange(num_b, device=scores.device) == 0)
    # the merge ops' rule for any scores: NaN never wins a row's best match, and the class
    # token's best is NaN, which sorts after every token (-inf ones included): never merged
    scores = scores.masked_fill(scores.isnan() | protected, -torch.inf)
    node_max, node_idx = scores.max(dim=-1)
    if class_token:
        node_max = node_max.masked_fill(torch.arange(num_a, device=scores.device) == 0, torch.nan)
    edge_idx = stable_argsort_descending(node_max)
    src_idx = edge_idx[..., :r, None]
    dst_idx = node_idx.gather(-1, edge_idx[..., :r])[..., None]
    if class_token:
        # index order: each unmerged token's place is the count of unmerged tokens before it
        merged = torch.zeros_like(node_idx, dtype=torch.bool).scatter(-1, edge_idx[..., :r], True)
        # each token's place: unmerged ones first in index order, then the merged ones
        unmerged_place = (~merged).long().cumsum(dim=-1) - 1
        merged_place = (num_a - r) + merged.long().cumsum(dim=-1) - 1
        order = _invert(torch.where(merged, merged_place, unmerged_place))
        unm_idx = order[..., :num_a - r, None]
    else:  # official ToMe: score order
        unm_idx = edge_idx[..., r:, None]
    return unm_idx, src_idx, dst_idx


def bipartite_merge_static(x: torch.Tensor, metric: torch.Tensor, r: int, size: torch.Tensor | None = None,
                           class_token: bool = True, distill_token: bool = False):
    """ToMe merge (see dcvit_engine.ops.tome_merge for the contract); returns (x, size)."""
    r, size = tome_start(x, r, size, class_token, distill_token)
    if r == 0:
        return x, size
    with torch.no_grad():
        plan = _merge_plan(metric, r, class_token, distill_token)

    # Sums in at least fp32, as the engine's kernels do (and ONNX Runtime's CPU scatter-add
    # takes no fp16); the result is rounded back to x's dtype.
    out_dtype, sum_dtype = x.dtype, torch.promote_types(x.dtype, torch.float32)
    x, size = x.to(sum_dtype), size.to(sum_dtype)
    merged = tome_merge_sum(x * size, *plan, distill_token)
    size = tome_merge_sum(size, *plan, distill_token)
    return (merged / size).to(out_dtype), size.to(out_dtype)
