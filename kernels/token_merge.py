"""Token merging: ToMe's bipartite soft matching and CAIT's grid-preserving ATME.

ToMe (facebookresearch/ToMe `bipartite_soft_matching` + `merge_wavg`) on the GPU:
  1. `_tome_best_match_kernel`: each A token's (even index) best B match (odd index) by
     cosine similarity. The L2 normalization is folded into the score tile (dot products
     and both sides' squared norms are accumulated in the same K loop), so the normalized
     metric and the (Na, Nb) score matrix never reach memory; only each row's max and
     argmax do.
  2. `_tome_rank_kernel`: each A token's place in ToMe's stable descending edge sort, by
     counting the tokens that sort before it (a few hundred A tokens: O(Na^2) compares are
     cheaper than a sort's launches).
  3. `_tome_plan_kernel`: from the ranks, the gather plan: per output token its own token
     and the list of tokens merged into it, in ToMe's output order.
  4. `_weighted_gather_kernel`: every output token is the size-weighted average of its
     list, read once from x, written once; sizes add up in the same pass. A gather instead
     of ToMe's scatter_reduce: no atomics, deterministic summation order.
Four launches per merge and no ATen op between them (the merge is launch-bound otherwise).

ATME (this project's definition of CAIT's asymmetric token merging, see docs/METHODS.md):
tokens are P prefix tokens followed by an H x W grid (row-major). Axis "w" merges the
column pairs (2j, 2j+1) of each row, axis "h" the row pairs (2i, 2i+1); the first token
of a pair is the destination. With s the cosine similarity of the pair's metric vectors, the
destination absorbs the share w = max(s, 0) of the source:
  size = size_dst + w * size_src,   alpha = w * size_src / size
  merged = (1 - alpha) * x_dst + alpha * x_src
so a dissimilar source (s <= 0) is dropped: x_dst and size_dst pass unchanged (its size is
not counted where nothing of it was kept), and identical ones (s = 1) average by size.
An odd last column/row and the prefix tokens pass through. `_atme_merge_kernel` computes
the similarity and the blend in one pass over the pairs; `_atme_unmerge_kernel` copies
each merged token back to both grid positions (for dense prediction heads).
"""
import torch
import triton
import triton.language as tl

from .launching import dot_precision, dot_upcast, launch_directly
from .merge_rules import atme_merged_grid, tome_effective_r, tome_protected  # noqa: F401 (re-exported)

# Cosine similarity of ATME pairs: dot / max(|a| |b|, COSINE_EPS) -- zero vectors give 0.
# ToMe's scores likewise divide by max(|m|, COSINE_EPS) per token.
COSINE_EPS = 1e-12

# Scores that are not numbers, on every backend (what ToMe itself leaves undefined):
#  - a NaN similarity (a NaN or Inf in the metric) never wins a row's best match: the row max
#    is over the numbers only, and a row with none gets -inf and B token 0, as torch.max of
#    an all -inf row;
#  - the edge sort is descending, stable, and NaN last; a protected (class) token's best is
#    NaN, so it sorts after every token, -inf ones included, and is never merged;
#  - an ATME pair whose similarity is NaN counts as dissimilar (nothing of the source kept).
# So the ranks are always a permutation and every gather index stays inside the batch's slice.


def score_dtype(metric):
    # Similarities are compared against each other to pick merges: score in at least fp32
    # so a bf16 metric does not create ties that fp32 would resolve.
    return torch.float64 if metric.dtype == torch.float64 else torch.float32



# ---- plain-PyTorch references ------------------------------------------------------

def tome_start(x, r, size, class_token, distill_token):
    """What every ToMe implementation does first: sizes default to ones, r is clamped
    (tome_effective_r). Returns (r, size); r == 0 means the merge is the identity."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    return tome_effective_r(x.shape[1], r, class_token, distill_token), size


def tome_scores(metric):
    """Cosine similarity of every A token (even index) with every B token (odd index),
    (B, Na, Nb), in score_dtype."""
    m = metric.to(score_dtype(metric))
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)  # a zero row scores 0
    return m[..., ::2, :] @ m[..., 1::2, :].transpose(-1, -2)


def tome_merge_sum(t, unm_idx, src_idx, dst_idx, distill_token):
    """ToMe's merge of t (B, N, C) by the plan (indices (B, k, 1) into A / B): the unmerged
    A tokens, then the B tokens with the merged A tokens added (class token, distillation
    token first with one, as ToMe)."""
    src, dst = t[..., ::2, :], t[..., 1::2, :]
    channels = t.shape[-1]
    unm = src.gather(-2, unm_idx.expand(-1, -1, channels))
    src = src.gather(-2, src_idx.expand(-1, -1, channels))
    dst = dst.scatter_add(-2, dst_idx.expand(-1, -1, channels), src)
    if distill_token:
        return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
    return torch.cat([unm, dst], dim=1)


def tome_merge_ref(x, metric, r, size=None, class_token=True, distill_token=False):
    """ToMe's bipartite soft matching followed by merge_wavg, transcribed step by step.

    Output order is ToMe's: the unmerged A tokens, then the B tokens (with a distillation
    token: class token, distillation token, then the rest of each). The unmerged A tokens are
    sorted back into token order only with a class token (to keep it first); without one
    they stay in score order (most similar first). That order matters: the next merge splits
    tokens into A and B by position, so a different order merges different tokens there.
    Differences from ToMe, neither of which changes which tokens merge for distinct scores:
    scores are computed in fp32 (or fp64) whatever the metric dtype, and the edge sort is
    stable (ties in token order).
    """
    r, size = tome_start(x, r, size, class_token, distill_token)
    if r == 0:
        return x, size
    with torch.no_grad():
        scores = tome_scores(metric)
        scores = scores.masked_fill(scores.isnan(), -torch.inf)  # NaN never wins a row's max
        if distill_token:
            scores[..., :, 0] = -torch.inf
        node_max, node_idx = scores.max(dim=-1)
        if class_token:
            node_max[..., 0] = torch.nan  # sorts after every token: never merged
        # descending, stable, NaN last (torch sorts NaN last in ascending order)
        edge_idx = (-node_max).argsort(dim=-1, stable=True)[..., None]
        unm_idx = edge_idx[..., r:, :]
        if class_token:  # ToMe sorts only to keep the class token first
            unm_idx = unm_idx.sort(dim=-2).values
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    merged = tome_merge_sum(x * size, unm_idx, src_idx, dst_idx, distill_token)
    size = tome_merge_sum(size, unm_idx, src_idx, dst_idx, distill_token)
    return merged / size, size


def _split_grid(t, grid, num_prefix_tokens):
    rows, cols = grid
    return t[:, :num_prefix_tokens], t[:, num_prefix_tokens:].reshape(t.shape[0], rows, cols, -1)


def atme_merge_ref(x, metric, grid, axis, num_prefix_tokens=1, size=None):
    """ATME with plain tensor ops; returns (x, size, new_grid)."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    dim = 2 if axis == "w" else 1  # grid dimension being halved in (B, H, W, C)
    parts = [_split_grid(t, grid, num_prefix_tokens) for t in (x, metric, size)]
    (x_pre, xg), (_, mg), (s_pre, sg) = parts
    pairs = grid[dim - 1] // 2

    def dst_src(t):
        return t.narrow(dim, 0, 2 * pairs).unflatten(dim, (pairs, 2)).unbind(dim + 1)

    (x_dst, x_src), (m_dst, m_src), (s_dst, s_src) = dst_src(xg), dst_src(mg), dst_src(sg)
    m_dst, m_src = m_dst.to(score_dtype(metric)), m_src.to(score_dtype(metric))
    cos = (m_dst * m_src).sum(-1, keepdim=True) / (
        m_dst.norm(dim=-1, keepdim=True) * m_src.norm(dim=-1, keepdim=True)).clamp_min(COSINE_EPS)
    cos = cos.masked_fill(cos.isnan(), 0.0)  # a NaN similarity counts as dissimilar
    absorbed = (1 + cos.clamp_min(0)) / 2 * s_src  # w * size_src, w = (1 + max(s, 0)) / 2 >= 1/2
    new_size = s_dst + absorbed
    alpha = (absorbed / new_size).to(x.dtype)
    merged = (1 - alpha) * x_dst + alpha * x_src
    merged_size = new_size.to(x.dtype)
    if grid[dim - 1] % 2:  # the odd last column / row stays as it is
        merged = torch.cat([merged, xg.narrow(dim, 2 * pairs, 1)], dim=dim)
        merged_size = torch.cat([merged_size, sg.narrow(dim, 2 * pairs, 1)], dim=dim)
    new_grid = atme_merged_grid(grid, axis)
    out = torch.cat([x_pre, merged.flatten(1, 2)], dim=1)
    return out, torch.cat([s_pre, merged_size.flatten(1, 2)], dim=1), new_grid


def atme_unmerge_ref(x, grid_before, axis, num_prefix_tokens=1):
    """Inverse layout of atme_merge: every merged token back at both of its positions."""
    rows, cols = grid_before
    prefix, merged = _split_grid(x, atme_merged_grid(grid_before, axis), num_prefix_tokens)
    if axis == "w":
        full = merged.repeat_interleave(2, dim=2)[:, :, :cols]
    else:
        full = merged.repeat_interleave(2, dim=1)[:, :rows]
    return torch.cat([prefix, full.flatten(1, 2)], dim=1)


# ---- Triton kernels ------------------------------------------------------------------

@triton.jit
def _tome_best_match_kernel(
    m_ptr, best_ptr, best_idx_ptr,
    NA, NB, CM, stride_mb, stride_mn, COS_EPS,
    CLASS_TOKEN: tl.constexpr, DISTILL_TOKEN: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    pid_a = tl.program_id(0).to(tl.int64)
    batch = tl.program_id(1).to(tl.int64)
    base = m_ptr + batch * stride_mb
    a_rows = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    a_ok = a_rows < NA
    a_ptrs = base + (2 * a_rows)[:, None] * stride_mn  # A = tokens 0, 2, 4, ...

    sq_a = tl.zeros((BLOCK_A,), dtype=tl.float32)
    for k in range(0, CM, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        at = tl.load(a_ptrs + ks[None, :], mask=a_ok[:, None] & (ks[None, :] < CM), other=0.0)
        at = at.to(tl.float32)
        sq_a += tl.sum(at * at, axis=1)
    # 1 / max(|a|, eps), as the reference: a zero row scores 0 (padding rows: norm 1)
    inv_a = 1.0 / tl.maximum(tl.sqrt(tl.where(a_ok, sq_a, 1.0)), COS_EPS)

    best = tl.full((BLOCK_A,), float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros((BLOCK_A,), dtype=tl.int64)
    for b0 in range(0, NB, BLOCK_B):
        b_rows = b0 + tl.arange(0, BLOCK_B)
        b_ok = b_rows < NB
        b_ptrs = base + (2 * b_rows + 1)[None, :] * stride_mn  # B = tokens 1, 3, 5, ...
        acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
        sq_b = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for k in range(0, CM, BLOCK_K):
            ks = k + tl.arange(0, BLOCK_K)
            at = tl.load(a_ptrs + ks[None, :], mask=a_ok[:, None] & (ks[None, :] < CM), other=0.0)
            bt = tl.load(b_ptrs + ks[:, None], mask=b_ok[None, :] & (ks[:, None] < CM), other=0.0)
            bf = bt.to(tl.float32)
            sq_b += tl.sum(bf * bf, axis=0)
            if DOT_UPCAST:
                acc = tl.dot(at.to(tl.float32), bf, acc, input_precision="ieee")
            else:
                acc = tl.dot(at, bt, acc, input_precision=DOT_PRECISION)
        inv_b = 1.0 / tl.maximum(tl.sqrt(tl.where(b_ok, sq_b, 1.0)), COS_EPS)
        scores = acc * inv_a[:, None] * inv_b[None, :]
        scores = tl.where(scores != scores, float("-inf"), scores)  # a NaN score never wins the row
        excluded = b_rows >= NB
        if DISTILL_TOKEN:  # B's first token is the distillation token: never a destination
            excluded = excluded | (b_rows == 0)
        scores = tl.where(excluded[None, :], float("-inf"), scores)
        tile_best = tl.max(scores, axis=1)
        tile_idx = tl.argmax(scores, axis=1).to(tl.int64) + b0
        # strict '>' keeps the earliest index on ties, as torch.max does
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, tile_idx, best_idx)
    if CLASS_TOKEN:  # the class token (A's first): NaN sorts last, so it is never merged away
        best = tl.where(a_rows == 0, float("nan"), best)
    tl.store(best_ptr + batch * NA + a_rows, best, mask=a_ok)
    tl.store(best_idx_ptr + batch * NA + a_rows, best_idx, mask=a_ok)


@triton.jit
def _tome_rank_kernel(best_ptr, rank_ptr, NA, BLOCK: tl.constexpr):
    """rank[i] = place of A token i in the stable descending sort of best, NaN last: the tokens
    with a higher score, plus the earlier tokens with the same score (torch's stable argsort),
    a number always before a NaN. A permutation of 0..NA-1 whatever the scores."""
    pid = tl.program_id(0).to(tl.int64)
    batch = tl.program_id(1).to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    i_ok = i < NA
    v_i = tl.load(best_ptr + batch * NA + i, mask=i_ok, other=0.0)
    nan_i = v_i != v_i
    rank = tl.zeros((BLOCK,), dtype=tl.int32)
    for j0 in range(0, NA, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        j_ok = j < NA
        v_j = tl.load(best_ptr + batch * NA + j, mask=j_ok, other=0.0)
        nan_j = v_j != v_j
        same = (v_j[None, :] == v_i[:, None]) | (nan_j[None, :] & nan_i[:, None])
        higher = ~nan_j[None, :] & (nan_i[:, None] | (v_j[None, :] > v_i[:, None]))
        before = higher | (same & (j[None, :] < i[:, None]))
        rank += tl.sum((before & j_ok[None, :]).to(tl.int32), axis=1)
    tl.store(rank_ptr + batch * NA + i, rank, mask=i_ok)


@triton.jit
def _tome_plan_kernel(
    rank_ptr, best_idx_ptr, primary_ptr, begin_ptr, count_ptr, sources_ptr,
    NA, NB, N_OUT, R,
    CLASS_TOKEN: tl.constexpr, DISTILL_TOKEN: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (tile, batch) places A tokens tile*BLOCK.. and B tokens tile*BLOCK.. in the
    plan. A tokens with rank < R merge into their best B match; the others are kept, in token
    order with a class token, else in rank (score) order, as ToMe. Merged tokens are listed
    by destination, then token order, so each B token's list is contiguous."""
    pid = tl.program_id(0).to(tl.int64)
    batch = tl.program_id(1).to(tl.int64)
    t = pid * BLOCK + tl.arange(0, BLOCK)
    a_ok = t < NA
    d_ok = t < NB
    rank_i = tl.load(rank_ptr + batch * NA + t, mask=a_ok, other=0)
    dst_i = tl.load(best_idx_ptr + batch * NA + t, mask=a_ok, other=0).to(tl.int32)
    merged_i = rank_i < R
    kept_before = tl.zeros((BLOCK,), dtype=tl.int32)   # kept A tokens before token i
    merged_before = tl.zeros((BLOCK,), dtype=tl.int32)  # merged tokens listed before token i
    count_d = tl.zeros((BLOCK,), dtype=tl.int32)        # tokens merged into B token d
    begin_d = tl.zeros((BLOCK,), dtype=tl.int32)        # tokens merged into B tokens < d
    t32 = t.to(tl.int32)
    for j0 in range(0, NA, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        j_ok = j < NA
        rank_j = tl.load(rank_ptr + batch * NA + j, mask=j_ok, other=0)
        dst_j = tl.load(best_idx_ptr + batch * NA + j, mask=j_ok, other=0).to(tl.int32)
        merged_j = (rank_j < R) & j_ok
        kept_j = (rank_j >= R) & j_ok
        earlier = j[None, :] < t[:, None]
        kept_before += tl.sum((kept_j[None, :] & earlier).to(tl.int32), axis=1)
        listed_before = (dst_j[None, :] < dst_i[:, None]) | ((dst_j[None, :] == dst_i[:, None]) & earlier)
        merged_before += tl.sum((merged_j[None, :] & listed_before).to(tl.int32), axis=1)
        count_d += tl.sum((merged_j[None, :] & (dst_j[None, :] == t32[:, None])).to(tl.int32), axis=1)
        begin_d += tl.sum((merged_j[None, :] & (dst_j[None, :] < t32[:, None])).to(tl.int32), axis=1)
    plan = batch * N_OUT
    zero = tl.zeros((BLOCK,), dtype=tl.int32)
    # kept A token: its place among the kept ones, then ToMe's slot (class, dist, rest)
    if CLASS_TOKEN:
        place = kept_before
    else:
        place = rank_i - R
    if DISTILL_TOKEN:
        slot = tl.where(place == 0, 0, place + 1)
    else:
        slot = place
    kept = a_ok & ~merged_i
    tl.store(primary_ptr + plan + slot, 2 * t32, mask=kept)
    tl.store(begin_ptr + plan + slot, zero, mask=kept)
    tl.store(count_ptr + plan + slot, zero, mask=kept)
    tl.store(sources_ptr + batch * R + merged_before, 2 * t32, mask=a_ok & merged_i)
    # B token d: after the NA - R kept A tokens; with a distillation token that one is second
    slot_d = NA - R + t32
    if DISTILL_TOKEN:
        slot_d = tl.where(t == 0, 1, slot_d)
    tl.store(primary_ptr + plan + slot_d, 2 * t32 + 1, mask=d_ok)
    tl.store(begin_ptr + plan + slot_d, begin_d, mask=d_ok)
    tl.store(count_ptr + plan + slot_d, count_d, mask=d_ok)


@triton.jit
def _weighted_gather_kernel(
    x_ptr, size_ptr, primary_ptr, begin_ptr, count_ptr, sources_ptr, out_ptr, size_out_ptr,
    N, N_OUT, C, R,
    HAS_SIZE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    o = tl.program_id(0).to(tl.int64)
    batch = tl.program_id(1).to(tl.int64)
    plan = batch * N_OUT + o
    own = tl.load(primary_ptr + plan).to(tl.int64)
    begin = tl.load(begin_ptr + plan).to(tl.int64)
    count = tl.load(count_ptr + plan)  # int32: a few tokens
    x_base = x_ptr + batch * N * C
    src_base = sources_ptr + batch * R + begin

    if HAS_SIZE:
        own_size = tl.load(size_ptr + batch * N + own).to(tl.float32)
    else:
        own_size = tl.full((), 1.0, dtype=tl.float32)
    total = own_size
    for k in range(count):
        src = tl.load(src_base + k)
        if HAS_SIZE:
            total += tl.load(size_ptr + batch * N + src).to(tl.float32)
        else:
            total += 1.0

    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = cols < C
        x_own = tl.load(x_base + own * C + cols, mask=ok, other=0.0).to(tl.float32)
        acc = x_own * own_size
        for k in range(count):
            src = tl.load(src_base + k).to(tl.int64)
            if HAS_SIZE:
                src_size = tl.load(size_ptr + batch * N + src).to(tl.float32)
            else:
                src_size = tl.full((), 1.0, dtype=tl.float32)
            acc += tl.load(x_base + src * C + cols, mask=ok, other=0.0).to(tl.float32) * src_size
        # a token nobody merged into is copied bit-exactly
        merged = tl.where(count == 0, x_own, acc / total)
        tl.store(out_ptr + (batch * N_OUT + o) * C + cols,
                 merged.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(size_out_ptr + plan, total.to(size_out_ptr.dtype.element_ty))


@triton.jit
def _atme_pair_tokens(o, P, H, W, W_OUT, AXIS_W: tl.constexpr):
    """Destination and source token index of output token o, and whether it has a source."""
    is_prefix = o < P
    g = tl.where(is_prefix, 0, o - P)
    if AXIS_W:
        i = g // W_OUT
        j = g % W_OUT
        dst = P + i * W + 2 * j
        has_src = 2 * j + 1 < W
        src = dst + 1
    else:
        i = g // W
        j = g % W
        dst = P + 2 * i * W + j
        has_src = 2 * i + 1 < H
        src = dst + W
    has_src = has_src & ~is_prefix
    dst = tl.where(is_prefix, o, dst)
    return dst, tl.where(has_src, src, dst), has_src


@triton.jit
def _atme_merge_kernel(
    x_ptr, m_ptr, size_ptr, out_ptr, size_out_ptr,
    N, N_OUT, C, CM, P, H, W, W_OUT, eps,
    AXIS_W: tl.constexpr, HAS_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    batch = tl.program_id(1).to(tl.int64)
    o = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = o < N_OUT
    dst, src, has_src = _atme_pair_tokens(o, P, H, W, W_OUT, AXIS_W)
    pair = ok & has_src

    m_base = m_ptr + batch * N * CM
    dot = tl.zeros((BLOCK_T,), dtype=tl.float32)
    sq_dst = tl.zeros((BLOCK_T,), dtype=tl.float32)
    sq_src = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for k in range(0, CM, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_ok = pair[:, None] & (ks[None, :] < CM)
        md = tl.load(m_base + dst[:, None] * CM + ks[None, :], mask=k_ok, other=0.0).to(tl.float32)
        ms = tl.load(m_base + src[:, None] * CM + ks[None, :], mask=k_ok, other=0.0).to(tl.float32)
        dot += tl.sum(md * ms, axis=1)
        sq_dst += tl.sum(md * md, axis=1)
        sq_src += tl.sum(ms * ms, axis=1)
    cos = dot / tl.maximum(tl.sqrt(sq_dst) * tl.sqrt(sq_src), eps)
    cos = tl.where(cos != cos, 0.0, cos)  # a NaN similarity counts as dissimilar

    if HAS_SIZE:
        s_dst = tl.load(size_ptr + batch * N + dst, mask=ok, other=1.0).to(tl.float32)
        s_src = tl.load(size_ptr + batch * N + src, mask=pair, other=0.0).to(tl.float32)
    else:
        s_dst = tl.full((BLOCK_T,), 1.0, dtype=tl.float32)
        s_src = tl.where(pair, 1.0, 0.0)
    absorbed = tl.where(pair, (1.0 + tl.maximum(cos, 0.0)) * 0.5, 0.0) * s_src  # w * size_src
    new_size = s_dst + absorbed
    alpha = absorbed / new_size
    tl.store(size_out_ptr + batch * N_OUT + o, new_size.to(size_out_ptr.dtype.element_ty), mask=ok)

    x_base = x_ptr + batch * N * C
    out_base = out_ptr + batch * N_OUT * C
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        c_ok = cols[None, :] < C
        xd = tl.load(x_base + dst[:, None] * C + cols[None, :], mask=ok[:, None] & c_ok, other=0.0)
        xs = tl.load(x_base + src[:, None] * C + cols[None, :], mask=pair[:, None] & c_ok, other=0.0)
        # alpha = 0 (unpaired, prefix or dissimilar) gives x_dst exactly
        merged = (1.0 - alpha[:, None]) * xd.to(tl.float32) + alpha[:, None] * xs.to(tl.float32)
        tl.store(out_base + o[:, None] * C + cols[None, :], merged.to(out_ptr.dtype.element_ty),
                 mask=ok[:, None] & c_ok)


@triton.jit
def _atme_unmerge_kernel(
    x_ptr, out_ptr, N_IN, N_FULL, C, P, W, W_IN,
    AXIS_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_t = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (t < N_FULL)[:, None] & (cols < C)[None, :]
    g = tl.where(t < P, 0, t - P)
    i = g // W
    j = g % W
    if AXIS_W:
        merged = P + i * W_IN + j // 2
    else:
        merged = P + (i // 2) * W_IN + j
    source = tl.where(t < P, t, merged)
    vals = tl.load(x_ptr + (batch * N_IN + source)[:, None] * C + cols[None, :], mask=ok, other=0.0)
    tl.store(out_ptr + (batch * N_FULL + t)[:, None] * C + cols[None, :], vals, mask=ok)


# ---- launchers -------------------------------------------------------------------------

def _on_gpu(t):
    return t.device.type == "cuda"


def tome_merge_plan_triton(node_max, node_idx, r, num_b, n_out, class_token, distill_token,
                           launch=launch_directly):
    """Gather plan from each A token's best B match (node_max/node_idx, (batch, Na)): int32
    `primary` (batch, n_out): each output token's own token; `begin`, `count` (batch, n_out):
    its merged-in tokens are sources[b, begin : begin + count]; `sources` (batch, r): the
    merged A tokens grouped by destination. Two launches; every element is written."""
    batch, num_a = node_max.shape
    device = node_max.device
    rank = torch.empty((batch, num_a), device=device, dtype=torch.int32)
    primary, begin, count = (torch.empty((batch, n_out), device=device, dtype=torch.int32)
                             for _ in range(3))
    sources = torch.empty((batch, r), device=device, dtype=torch.int32)
    block = 64 if device.type == "cuda" else 32
    tiles = triton.cdiv(num_a, block)
    launch(_tome_rank_kernel)[(tiles, batch)](node_max, rank, num_a, BLOCK=block,
                                              num_warps=4 if device.type == "cuda" else 1)
    launch(_tome_plan_kernel)[(tiles, batch)](
        rank, node_idx, primary, begin, count, sources, num_a, num_b, n_out, r,
        CLASS_TOKEN=class_token, DISTILL_TOKEN=distill_token, BLOCK=block,
        num_warps=4 if device.type == "cuda" else 1,
    )
    return primary, begin, count, sources


def _match_config(device_type):
    # tl.dot needs tiles of at least 16; the interpreter pays per tile element.
    if device_type != "cuda":
        return dict(BLOCK_A=16, BLOCK_B=32, BLOCK_K=16, num_warps=4)
    return dict(BLOCK_A=64, BLOCK_B=64, BLOCK_K=32, num_warps=4, num_stages=2)


def _channel_block(channels, device_type):
    cap = 1024 if device_type == "cuda" else 128
    return min(cap, triton.next_power_of_2(channels))


def _size_or_none(size):
    return None if size is None else size.contiguous()


def _check_outputs(op, **buffers):
    # the kernels read every input contiguous (made so above) and write outputs by index
    # arithmetic without strides: a caller's buffer must be contiguous, as the C++ ops require
    for name, t in buffers.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous, got strides {tuple(t.stride())}")


def tome_merge_triton(x, metric, r, size=None, class_token=True, distill_token=False, *,
                      out=None, size_out=None, launch=None):
    """ToMe merge with the Triton kernels; returns (x, size). Writes into `out`/`size_out`
    when given (tests poison them). `launch` wraps each kernel (see launching.py)."""
    launch = launch or launch_directly
    _check_outputs("tome_merge", out=out, size_out=size_out)
    batch, tokens, channels = x.shape
    r = tome_effective_r(tokens, r, class_token, distill_token)
    n_out = tokens - r
    if out is None:
        out = torch.empty((batch, n_out, channels), device=x.device, dtype=x.dtype)
    if size_out is None:
        size_out = torch.empty((batch, n_out, 1), device=x.device, dtype=x.dtype)
    if r == 0:
        out.copy_(x)
        size_out.copy_(size) if size is not None else size_out.fill_(1)
        return out, size_out
    x, metric, size = x.contiguous(), metric.contiguous(), _size_or_none(size)
    num_a, num_b, dim_m = (tokens + 1) // 2, tokens // 2, metric.shape[-1]
    node_max = torch.empty((batch, num_a), device=x.device, dtype=torch.float32)
    node_idx = torch.empty((batch, num_a), device=x.device, dtype=torch.int64)
    cfg = _match_config(x.device.type)
    launch(_tome_best_match_kernel)[(triton.cdiv(num_a, cfg["BLOCK_A"]), batch)](
        metric, node_max, node_idx, num_a, num_b, dim_m, metric.stride(0), metric.stride(1), COSINE_EPS,
        CLASS_TOKEN=class_token, DISTILL_TOKEN=distill_token,
        DOT_PRECISION=dot_precision(metric.dtype),
        DOT_UPCAST=dot_upcast(x.device.type, metric.dtype), **cfg,
    )
    primary, begin, count, sources = tome_merge_plan_triton(
        node_max, node_idx, r, num_b, n_out, class_token, distill_token, launch)
    block_c = _channel_block(channels, x.device.type)
    launch(_weighted_gather_kernel)[(n_out, batch)](
        x, size if size is not None else x, primary, begin, count, sources, out, size_out,
        tokens, n_out, channels, r,
        HAS_SIZE=size is not None, BLOCK_C=block_c,
        # 8 channels per thread: 16-byte accesses for bf16 (sm_90 SASS: 8-byte with 4 warps at 512)
        num_warps=max(1, min(8, block_c // 256)) if _on_gpu(x) else 1,
    )
    return out, size_out


def atme_merge_triton(x, metric, grid, axis, num_prefix_tokens=1, size=None, *, out=None,
                      size_out=None, launch=None):
    """ATME with one fused kernel; returns (x, size, new_grid)."""
    launch = launch or launch_directly
    _check_outputs("atme_merge", out=out, size_out=size_out)
    batch, tokens, channels = x.shape
    new_grid = atme_merged_grid(grid, axis)
    n_out = num_prefix_tokens + new_grid[0] * new_grid[1]
    if out is None:
        out = torch.empty((batch, n_out, channels), device=x.device, dtype=x.dtype)
    if size_out is None:
        size_out = torch.empty((batch, n_out, 1), device=x.device, dtype=x.dtype)
    x, metric, size = x.contiguous(), metric.contiguous(), _size_or_none(size)
    gpu = _on_gpu(x)
    block_t = 32 if gpu else 16
    launch(_atme_merge_kernel)[(triton.cdiv(n_out, block_t), batch)](
        x, metric, size if size is not None else x, out, size_out,
        tokens, n_out, channels, metric.shape[-1], num_prefix_tokens, grid[0], grid[1],
        new_grid[1], COSINE_EPS,
        AXIS_W=axis == "w", HAS_SIZE=size is not None, BLOCK_T=block_t,
        BLOCK_K=min(64, triton.next_power_of_2(metric.shape[-1])),
        BLOCK_C=min(128 if gpu else 64, triton.next_power_of_2(channels)),
        num_warps=4 if gpu else 1,
    )
    return out, size_out, new_grid


def atme_unmerge_triton(x, grid_before, axis, num_prefix_tokens=1, *, out=None, launch=None):
    """Restores the H x W grid of grid_before: each merged token at both of its positions."""
    launch = launch or launch_directly
    _check_outputs("atme_unmerge", out=out)
    batch, tokens, channels = x.shape
    rows, cols = grid_before
    n_full = num_prefix_tokens + rows * cols
    if out is None:
        out = torch.empty((batch, n_full, channels), device=x.device, dtype=x.dtype)
    x = x.contiguous()
    gpu = _on_gpu(x)
    block_t, block_c = (32, min(128, triton.next_power_of_2(channels))) if gpu else (16, 64)
    launch(_atme_unmerge_kernel)[(triton.cdiv(n_full, block_t), triton.cdiv(channels, block_c), batch)](
        x, out, tokens, n_full, channels, num_prefix_tokens, cols,
        atme_merged_grid(grid_before, axis)[1],
        AXIS_W=axis == "w", BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4 if gpu else 1,
    )
    return out
