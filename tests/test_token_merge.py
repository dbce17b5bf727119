"""ToMe bipartite merge and CAIT's ATME merge/unmerge on every backend.

The plain-PyTorch references are first checked against independent loop implementations
(token by token, pair by pair, float64); every backend is then checked against the
float64 reference, and, through one-hot token features, for merging exactly the same tokens.
"""
import pytest
import torch

from conftest import cpu_backends, requires_cuda, requires_interpreter
from dcvit_engine import ops
from dcvit_engine.kernels.token_merge import (
    atme_merge_ref,
    atme_merge_triton,
    atme_unmerge_ref,
    atme_unmerge_triton,
    tome_merge_ref,
    tome_merge_triton,
)
from numerics import assert_close_to_reference, poisoned_like

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# ATME sizes are fractional: one unit in the last place of each dtype (the Triton interpreter
# truncates to bf16 instead of rounding), plus fp32 score rounding
SIZE_RTOL = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10 + 1e-6}
# (prefix tokens, grid): N = 197, 65, 50 with a class token; 2 prefix tokens; odd 7 x 5
LAYOUTS = [(1, (14, 14)), (1, (8, 8)), (1, (7, 7)), (2, (7, 7)), (2, (7, 5)), (0, (5, 7))]


# ---- independent loop implementations ----------------------------------------------

def loop_tome(x, metric, r, size, class_token, distill_token):
    """ToMe's algorithm written token by token. Returns (x, size, groups): groups[i] is
    the sorted list of input tokens that output token i averages."""
    batch, tokens, _ = x.shape
    protected = int(class_token) + int(distill_token)
    r = max(0, min(r, (tokens - protected) // 2))
    outs, sizes, all_groups = [], [], []
    for b in range(batch):
        s = size[b, :, 0] if size is not None else torch.ones(tokens, dtype=x.dtype)
        a_tokens, b_tokens = list(range(0, tokens, 2)), list(range(1, tokens, 2))
        candidates = [t for t in b_tokens if not (distill_token and t == 1)]
        cand = metric[b, candidates]
        best = {}
        for a in a_tokens:
            if class_token and a == 0:
                continue
            sims = (cand @ metric[b, a] / (cand.norm(dim=1) * metric[b, a].norm())).tolist()
            k = max(range(len(sims)), key=lambda i: sims[i])
            best[a] = (sims[k], candidates[k])
        # ToMe's edge order: most similar first, ties in token order; the class token last
        by_score = sorted(best, key=lambda a: -best[a][0]) + ([0] if class_token else [])
        merged_a = by_score[:r]
        groups = {t: [t] for t in b_tokens}
        for a in merged_a:
            groups[best[a][1]].append(a)
        # kept A tokens: back in token order only with a class token, else in score order
        kept_a = sorted(by_score[r:]) if class_token else by_score[r:]
        order = [[a] for a in kept_a] + [sorted(groups[t]) for t in b_tokens]
        if distill_token:
            order = [order[0], order[len(kept_a)]] + order[1:len(kept_a)] + order[len(kept_a) + 1:]
        outs.append(torch.stack([sum(x[b, t] * s[t] for t in g) / sum(s[t] for t in g) for g in order]))
        sizes.append(torch.stack([sum(s[t] for t in g) for g in order])[:, None])
        all_groups.append(order)
    return torch.stack(outs), torch.stack(sizes), all_groups


def loop_atme(x, metric, grid, axis, prefix, size):
    rows, cols = grid
    tokens = x.shape[1]
    s = size[..., 0] if size is not None else torch.ones(x.shape[:2], dtype=x.dtype)
    outs, sizes = [], []
    for b in range(x.shape[0]):
        out_rows, out_sizes = [x[b, t] for t in range(prefix)], [s[b, t] for t in range(prefix)]
        pos = lambda i, j: prefix + i * cols + j  # noqa: E731
        if axis == "w":
            pairs = [(pos(i, j), pos(i, j + 1) if j + 1 < cols else None)
                     for i in range(rows) for j in range(0, cols, 2)]
        else:
            pairs = [(pos(i, j), pos(i + 1, j) if i + 1 < rows else None)
                     for i in range(0, rows, 2) for j in range(cols)]
        for dst, src in pairs:
            if src is None:
                out_rows.append(x[b, dst])
                out_sizes.append(s[b, dst])
                continue
            cos = torch.dot(metric[b, dst], metric[b, src]) / (metric[b, dst].norm() * metric[b, src].norm())
            absorbed = (1 + max(float(cos), 0.0)) / 2 * s[b, src]  # a dissimilar source: half
            alpha = absorbed / (s[b, dst] + absorbed)
            out_rows.append((1 - alpha) * x[b, dst] + alpha * x[b, src])
            out_sizes.append(s[b, dst] + absorbed)
        assert len(out_rows) <= tokens
        outs.append(torch.stack(out_rows))
        sizes.append(torch.stack(out_sizes)[:, None])
    return torch.stack(outs), torch.stack(sizes)


# ---- inputs ----------------------------------------------------------------------------

def make_inputs(batch, tokens, channels, metric_dim, with_size):
    """float64 inputs; sizes are small counts as after earlier merges."""
    x = torch.randn(batch, tokens, channels, dtype=torch.float64) * 2 + 0.3
    metric = torch.randn(batch, tokens, metric_dim, dtype=torch.float64)
    size = torch.randint(1, 5, (batch, tokens, 1)).double() if with_size else None
    return x, metric, size


def cast(t, dtype, device="cpu"):
    return None if t is None else t.to(device=device, dtype=dtype)


def one_hot_tokens(batch, tokens, dtype, device="cpu"):
    """x whose output reveals which tokens each merged token averages (its nonzeros)."""
    return torch.eye(tokens, dtype=dtype, device=device).expand(batch, tokens, tokens).contiguous()


def groups_from_one_hot(out):
    return [[(row > 0).nonzero().flatten().tolist() for row in out[b].float().cpu()]
            for b in range(out.shape[0])]


TOME_CASES = [  # (tokens, r, class_token, distill_token)
    (197, 16, True, False), (197, 98, True, False), (65, 13, True, True),
    (50, 8, True, False), (50, 24, False, False), (65, 31, True, True), (66, 20, False, False),
]


# ---- ToMe ---------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens,r,class_token,distill_token", TOME_CASES)
@pytest.mark.parametrize("with_size", [False, True])
def test_tome_reference_matches_loop(tokens, r, class_token, distill_token, with_size):
    x, metric, size = make_inputs(2, tokens, 7, 5, with_size)
    out, out_size = tome_merge_ref(x, metric, r, size, class_token, distill_token)
    expected, expected_size, groups = loop_tome(x, metric, r, size, class_token, distill_token)
    assert out.shape == expected.shape and torch.equal(out_size, expected_size)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    ids, _ = tome_merge_ref(one_hot_tokens(2, tokens, torch.float64), metric, r, size,
                            class_token, distill_token)
    assert groups_from_one_hot(ids) == groups
    assert out_size.sum(1).flatten().tolist() == (size.sum(1) if with_size else
                                                  torch.full((2, 1), tokens)).flatten().tolist()
    protected = int(class_token) + int(distill_token)
    torch.testing.assert_close(out[:, :protected], x[:, :protected])  # x * size / size


def check_tome_backend(backend, tokens, r, class_token, distill_token, dtype, with_size,
                       batch=2, channels=40, metric_dim=24, device="cpu"):
    x64, m64, s64 = make_inputs(batch, tokens, channels, metric_dim, with_size)
    # reference on the same (rounded) inputs, so both see the same similarities
    m64 = m64.to(dtype).double()
    x, metric, size = cast(x64, dtype, device), cast(m64, dtype, device), cast(s64, dtype, device)
    ref64, ref_size = tome_merge_ref(x.double().cpu(), m64, r, s64, class_token, distill_token)
    same_precision, _ = tome_merge_ref(x.cpu(), metric.cpu(), r, cast(s64, dtype),
                                       class_token, distill_token)
    out, out_size = ops.tome_merge(x, metric, r, size, class_token, distill_token, backend=backend)
    assert out.dtype == dtype and out_size.dtype == dtype and out.shape == ref64.shape
    assert torch.equal(out_size.double().cpu(), ref_size)
    interp_bf16 = backend == "triton" and device == "cpu" and dtype == torch.bfloat16
    assert_close_to_reference(out.cpu(), ref64, same_precision, interpreter_bf16=interp_bf16,
                              what=f"tome {backend} {dtype} N={tokens} r={r}")
    # exactly the same tokens merge
    ids, _ = ops.tome_merge(one_hot_tokens(batch, tokens, torch.float32, device), metric.float(),
                                 r, cast(s64, torch.float32, device), class_token, distill_token,
                                 backend=backend)
    ref_ids, _ = tome_merge_ref(one_hot_tokens(batch, tokens, torch.float64), m64, r, s64,
                                class_token, distill_token)
    assert groups_from_one_hot(ids) == groups_from_one_hot(ref_ids)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,r,class_token,distill_token", TOME_CASES)
def test_tome_cpu_backend(tokens, r, class_token, distill_token, dtype):
    check_tome_backend("cpu", tokens, r, class_token, distill_token, dtype, with_size=True)
    check_tome_backend("cpu", tokens, r, class_token, distill_token, dtype, with_size=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,r,class_token,distill_token,with_size",
                         [(197, 40, True, False, True), (65, 13, True, True, False),
                          (50, 24, False, False, True)])
@requires_interpreter
def test_tome_triton_backend_interpreted(tokens, r, class_token, distill_token, with_size, dtype):
    check_tome_backend("triton", tokens, r, class_token, distill_token, dtype, with_size=with_size,
                       batch=1, channels=24, metric_dim=20)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tome_torch_backend(dtype):
    check_tome_backend("torch", 65, 13, True, True, dtype, with_size=True)


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,r,class_token,distill_token", TOME_CASES)
def test_tome_gpu_backends(backend, tokens, r, class_token, distill_token, dtype):
    check_tome_backend(backend, tokens, r, class_token, distill_token, dtype, with_size=True,
                       batch=3, channels=384, metric_dim=64, device="cuda")


def test_tome_r_is_clamped_like_tome():
    x, metric, _ = make_inputs(2, 50, 8, 6, False)
    for backend in ("torch", "cpu"):
        out, size = ops.tome_merge(x.float(), metric.float(), 1000, backend=backend)
        assert out.shape == (2, 50 - 24, 8) and size.sum(1).flatten().tolist() == [50.0, 50.0]
        out, size = ops.tome_merge(x.float(), metric.float(), 0, backend=backend)
        assert torch.equal(out, x.float()) and torch.equal(size, torch.ones(2, 50, 1))


# ---- ATME ---------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix,grid", LAYOUTS)
@pytest.mark.parametrize("axis", ["w", "h"])
@pytest.mark.parametrize("with_size", [False, True])
def test_atme_reference_matches_loop(prefix, grid, axis, with_size):
    tokens = prefix + grid[0] * grid[1]
    x, metric, size = make_inputs(2, tokens, 6, 5, with_size)
    out, out_size, new_grid = atme_merge_ref(x, metric, grid, axis, prefix, size)
    expected, expected_size = loop_atme(x, metric, grid, axis, prefix, size)
    rows, cols = grid
    assert new_grid == ((rows, (cols + 1) // 2) if axis == "w" else ((rows + 1) // 2, cols))
    assert out.shape == (2, prefix + new_grid[0] * new_grid[1], 6)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_size, expected_size, rtol=1e-12, atol=0)
    # sizes never grow past the sum (only the absorbed share of a source counts)
    total = size.sum(1) if with_size else torch.full((2, 1), float(tokens), dtype=torch.float64)
    assert (out_size.sum(1) <= total + 1e-9).all()
    assert torch.equal(out[:, :prefix], x[:, :prefix])


def test_atme_is_asymmetric():
    """Equal sizes: identical metrics give the plain average; the destination dominates
    otherwise (it absorbs the share (1 + max(s, 0)) / 2 of the source, and that share's size),
    so an anti-correlated or orthogonal source still contributes half its content."""
    x = torch.randn(1, 1 + 2, 4, dtype=torch.float64)
    w = 2**-0.5
    share = (1 + w) / 2
    cases = [([1.0, 0.0], 0.5, 2.0), ([1.0, 1.0], share / (1 + share), 1 + share),
             ([-1.0, 0.0], 1 / 3, 1.5), ([0.0, 1.0], 1 / 3, 1.5)]
    for metric_src, alpha, merged_size in cases:
        metric = torch.tensor([[[0.3, 0.2], [1.0, 0.0], metric_src]], dtype=torch.float64)
        out, size, grid = atme_merge_ref(x, metric, (1, 2), "w", 1)
        torch.testing.assert_close(out[0, 1], (1 - alpha) * x[0, 1] + alpha * x[0, 2])
        assert grid == (1, 1)
        torch.testing.assert_close(size[0, :, 0], torch.tensor([1.0, merged_size], dtype=torch.float64))


@pytest.mark.parametrize("backend", ["torch", "cpu", pytest.param("triton", marks=requires_interpreter)])
def test_atme_dissimilar_source_still_contributes_on_every_backend(backend):
    """A source whose metric opposes the destination's (s < 0) is not dropped: it adds half its
    size and content (weight (1 + max(s, 0)) / 2); a source at s = 0.5 adds three quarters."""
    x = torch.randn(1, 1 + 4, 8)
    size = torch.tensor([[[1.0], [3.0], [2.0], [1.0], [4.0]]])
    half = [0.5, 0.75 ** 0.5]  # cos = 0.5 against [1, 0]
    metric = torch.tensor([[[0.2, 0.1], [1.0, 0.0], [-1.0, 0.3], [1.0, 0.0], half]])
    out, out_size, _ = ops.atme_merge(x, metric, (1, 4), "w", 1, size, backend=backend)
    torch.testing.assert_close(out_size[0, 1, 0], torch.tensor(3.0 + 0.5 * 2.0))
    alpha = 0.5 * 2.0 / 4.0
    torch.testing.assert_close(out[0, 1], (1 - alpha) * x[0, 1] + alpha * x[0, 2])
    torch.testing.assert_close(out_size[0, 2, 0], torch.tensor(1.0 + 0.75 * 4.0))
    alpha = 0.75 * 4.0 / 4.0
    torch.testing.assert_close(out[0, 2], (1 - alpha) * x[0, 3] + alpha * x[0, 4])


def check_atme_backend(backend, prefix, grid, axis, dtype, with_size, batch=2, channels=40,
                       metric_dim=24, device="cpu"):
    tokens = prefix + grid[0] * grid[1]
    x64, m64, s64 = make_inputs(batch, tokens, channels, metric_dim, with_size)
    m64 = m64.to(dtype).double()
    x, metric, size = cast(x64, dtype, device), cast(m64, dtype, device), cast(s64, dtype, device)
    ref64, ref_size, ref_grid = atme_merge_ref(x.double().cpu(), m64, grid, axis, prefix, s64)
    same_precision, _, _ = atme_merge_ref(x.cpu(), metric.cpu(), grid, axis, prefix, cast(s64, dtype))
    out, out_size, new_grid = ops.atme_merge(x, metric, grid, axis, prefix, size, backend=backend)
    assert new_grid == ref_grid and out.shape == ref64.shape and out.dtype == dtype
    # sizes are fractional (the absorbed share): one rounding to the dtype, at most
    torch.testing.assert_close(out_size.double().cpu(), ref_size, rtol=SIZE_RTOL[dtype], atol=0)
    interp_bf16 = backend == "triton" and device == "cpu" and dtype == torch.bfloat16
    assert_close_to_reference(out.cpu(), ref64, same_precision, interpreter_bf16=interp_bf16,
                              what=f"atme {backend} {dtype} {prefix}+{grid} axis={axis}")
    full = ops.atme_unmerge(out, grid, axis, prefix, backend=backend)
    assert torch.equal(full.cpu(), atme_unmerge_ref(out.cpu(), grid, axis, prefix))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prefix,grid", LAYOUTS)
@pytest.mark.parametrize("axis", ["w", "h"])
def test_atme_cpu_backend(prefix, grid, axis, dtype):
    check_atme_backend("cpu", prefix, grid, axis, dtype, with_size=True)
    check_atme_backend("cpu", prefix, grid, axis, dtype, with_size=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prefix,grid,with_size", [(1, (14, 14), True), (2, (7, 5), False)])
@pytest.mark.parametrize("axis", ["w", "h"])
@requires_interpreter
def test_atme_triton_backend_interpreted(prefix, grid, with_size, axis, dtype):
    check_atme_backend("triton", prefix, grid, axis, dtype, with_size=with_size, batch=1,
                       channels=24, metric_dim=20)


@pytest.mark.parametrize("dtype", DTYPES)
def test_atme_torch_backend(dtype):
    check_atme_backend("torch", 2, (7, 5), "h", dtype, with_size=True)


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prefix,grid", LAYOUTS)
@pytest.mark.parametrize("axis", ["w", "h"])
def test_atme_gpu_backends(backend, prefix, grid, axis, dtype):
    check_atme_backend(backend, prefix, grid, axis, dtype, with_size=True, batch=3, channels=384,
                       metric_dim=64, device="cuda")


@pytest.mark.parametrize("prefix,grid", [(1, (7, 7)), (2, (7, 5)), (0, (4, 6))])
@pytest.mark.parametrize("axis", ["w", "h"])
def test_atme_unmerge_restores_grid_with_merged_values_in_both_positions(prefix, grid, axis):
    x, metric, _ = make_inputs(2, prefix + grid[0] * grid[1], 6, 5, False)
    merged, _, new_grid = atme_merge_ref(x, metric, grid, axis, prefix)
    for backend in cpu_backends("torch", "cpu", "triton"):
        full = ops.atme_unmerge(merged.float(), grid, axis, prefix, backend=backend)
        assert full.shape == x.shape
        assert torch.equal(full[:, :prefix], merged[:, :prefix].float())
        cells = full[:, prefix:].reshape(2, *grid, 6)
        small = merged[:, prefix:].float().reshape(2, *new_grid, 6)
        for i in range(grid[0]):
            for j in range(grid[1]):
                mi, mj = (i, j // 2) if axis == "w" else (i // 2, j)
                assert torch.equal(cells[:, i, j], small[:, mi, mj])


# ---- scores that are not numbers: defined order, no index out of bounds ------------------

NAN, INF = float("nan"), float("inf")


def nasty_metric(batch=3, tokens=23, dim=6, dtype=torch.float32, device="cpu"):
    """Random metric rows with, in element 0, a NaN A token (4), a zero A token (6) and a zero
    B token (7); in element 1 an Inf A token (8), a -Inf channel in B token (9) and a NaN B
    token (11); element 2 all NaN."""
    gen = torch.Generator().manual_seed(22)
    m = torch.randn(batch, tokens, dim, generator=gen)
    m[0, 4] = NAN
    m[0, 6] = 0.0
    m[0, 7] = 0.0
    m[1, 8, 0] = INF
    m[1, 9, 2] = -INF
    m[1, 11, 1] = NAN
    m[2] = NAN
    return m.to(device, dtype)


def check_merge_groups(out, what):
    """x was one-hot per token: every input token must appear in exactly
    one output row, so no token was read twice, dropped, or taken from outside its slice."""
    hits = (out.float() != 0).sum(dim=0)  # per input token: the output rows holding it
    assert torch.equal(hits, torch.ones_like(hits)), f"{what}: tokens not used exactly once: {hits}"


@pytest.mark.parametrize("backend", ["torch", "cpu", pytest.param("triton", marks=requires_interpreter)])
@pytest.mark.parametrize("class_token,distill_token", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("r", [5, 11])
def test_tome_nan_inf_and_zero_metrics_give_a_defined_order_and_finite_outputs(backend, class_token,
                                                                                distill_token, r):
    tokens = 23
    metric = nasty_metric(tokens=tokens)
    x = torch.eye(tokens).expand(3, tokens, tokens).contiguous()  # one-hot: output rows show groups
    size = 1 + torch.arange(3 * tokens, dtype=torch.float32).reshape(3, tokens, 1) % 3
    out, out_size = ops.tome_merge(x, metric, r, size, class_token, distill_token, backend=backend)
    # scores in fp32 as every backend's (the metric's dtype), the averages in fp64
    ref, ref_size = tome_merge_ref(x.double(), metric, r, size.double(), class_token, distill_token)
    assert torch.isfinite(out).all() and torch.isfinite(out_size).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_size.double(), ref_size)
    torch.testing.assert_close(out_size.sum(1), size.sum(1))  # every token's size counted once
    for b in range(3):
        check_merge_groups(out[b], f"{backend} element {b}")
    if class_token:  # the class token is never merged, whatever the other scores
        assert out[:, 0, 0].tolist() == [1.0] * 3 and (out[:, 0, 1:] == 0).all()
    if r == 5 and class_token and not distill_token:
        # NaN last: the NaN A token 4 of element 0 has no number to merge by, and 10 A tokens do
        kept = [int(row.nonzero()[0]) for row in out[0, : (tokens + 1) // 2 - r]]
        assert 4 in kept


def test_tome_reference_sorts_nan_after_every_number_and_the_class_token_after_nan():
    # element 2's metric is all NaN: no A token has a number, so they merge in token order,
    # the class token (NaN by rule) still last
    metric = nasty_metric()
    x = torch.eye(23).expand(3, 23, 23).contiguous()
    out, _ = tome_merge_ref(x, metric, 11, None, True, False)
    assert out[2, 0, 0] == 1.0 and (out[2, 0, 1:] == 0).all()
    first_b = out[2, 1]  # all 11 A tokens merged into B token 1 (the first of an all -inf row)
    assert sorted(first_b.nonzero().flatten().tolist()) == [1] + list(range(2, 23, 2))


@pytest.mark.parametrize("backend", ["torch", "cpu", pytest.param("triton", marks=requires_interpreter)])
def test_atme_nan_inf_and_zero_metrics_count_as_dissimilar(backend):
    prefix, grid = 1, (3, 4)
    tokens = prefix + 12
    x = torch.randn(2, tokens, 5, generator=torch.Generator().manual_seed(3))
    metric = torch.randn(2, tokens, 4, generator=torch.Generator().manual_seed(4))
    metric[0, 1] = NAN     # pair (1, 2) of row 0: NaN
    metric[0, 4, 2] = INF  # pair (3, 4): Inf
    metric[1, 5] = 0.0     # pair (5, 6): zero norm
    size = torch.full((2, tokens, 1), 2.0)
    out, out_size, _ = ops.atme_merge(x, metric, grid, "w", prefix, size, backend=backend)
    assert torch.isfinite(out).all() and torch.isfinite(out_size).all()
    ref, ref_size, _ = atme_merge_ref(x, metric, grid, "w", prefix, size)
    torch.testing.assert_close((out, out_size), (ref, ref_size))
    for b, pair_out, dst in ((0, 1, 1), (0, 2, 3), (1, 3, 5)):  # the source at the floor weight 1/2
        assert out_size[b, pair_out, 0] == 3.0
        torch.testing.assert_close(out[b, pair_out], (2 * x[b, dst] + x[b, dst + 1]) / 3)


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_merges_with_nan_inf_and_zero_metrics_stay_in_bounds(backend):
    """The GPU kernels on the same inputs (run under compute-sanitizer by gpu_check --sanitize):
    the same tokens merge as in the reference, every output element written."""
    tokens = 197
    metric = nasty_metric(batch=3, tokens=tokens, dim=64, device="cuda")
    x = torch.eye(tokens, device="cuda").expand(3, tokens, tokens).contiguous()
    for class_token, distill_token in [(True, False), (False, False), (True, True)]:
        ref, ref_size = tome_merge_ref(x.double(), metric, 50, None, class_token, distill_token)
        out, out_size = ops.tome_merge(x, metric, 50, None, class_token, distill_token, backend=backend)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out_size.double(), ref_size)
    grid_x = x[:, :1 + 14 * 14, :8].contiguous()
    merged, size, _ = ops.atme_merge(grid_x, metric[:, :197], (14, 14), "h", 1, None, backend=backend)
    assert torch.isfinite(merged).all() and torch.isfinite(size).all()


# ---- out= buffers, opcheck, torch.compile, bad input ------------------------------------

def test_out_variants_write_every_element():
    x, metric, size = (t.float() for t in make_inputs(2, 65, 24, 16, True))
    ref, ref_size = tome_merge_ref(x, metric, 20, size)
    out, size_out = poisoned_like(ref), poisoned_like(ref_size)
    torch.ops.dcvit.tome_merge.out(x, metric, 20, size, True, False, out=out, size_out=size_out)
    torch.testing.assert_close((out, size_out), (ref, ref_size))

    ref, ref_size, _ = atme_merge_ref(x, metric, (8, 8), "h", 1, size)
    out, size_out = poisoned_like(ref), poisoned_like(ref_size)
    torch.ops.dcvit.atme_merge.out(x, metric, 8, 8, "h", 1, size, out=out, size_out=size_out)
    torch.testing.assert_close((out, size_out), (ref, ref_size))

    full_ref = atme_unmerge_ref(ref, (8, 8), "h", 1)
    full = poisoned_like(full_ref)
    torch.ops.dcvit.atme_unmerge.out(ref, 8, 8, "h", 1, out=full)
    assert torch.equal(full, full_ref)


@requires_interpreter
def test_triton_out_variants_write_every_element():
    x, metric, size = (t.float() for t in make_inputs(2, 65, 24, 16, True))
    ref, ref_size = tome_merge_ref(x, metric, 20, size)
    out, size_out = poisoned_like(ref), poisoned_like(ref_size)
    tome_merge_triton(x, metric, 20, size, out=out, size_out=size_out)
    torch.testing.assert_close((out, size_out), (ref, ref_size))

    ref, ref_size, _ = atme_merge_ref(x, metric, (8, 8), "h", 1, size)
    out, size_out = poisoned_like(ref), poisoned_like(ref_size)
    atme_merge_triton(x, metric, (8, 8), "h", 1, size, out=out, size_out=size_out)
    torch.testing.assert_close((out, size_out), (ref, ref_size))

    full_ref = atme_unmerge_ref(ref, (8, 8), "h", 1)
    full = poisoned_like(full_ref)
    assert torch.equal(atme_unmerge_triton(ref, (8, 8), "h", 1, out=full), full_ref)


def test_triton_launchers_refuse_strided_output_buffers():
    # the kernels write outputs without strides; a strided buffer would be written wrongly
    x, metric, size = (t.float() for t in make_inputs(1, 17, 8, 4, True))
    out = torch.empty(1, 8, 13).transpose(1, 2)  # (1, 13, 8), not contiguous
    with pytest.raises(ValueError, match="tome_merge: out must be contiguous"):
        tome_merge_triton(x, metric, 4, size, out=out)
    with pytest.raises(ValueError, match="atme_unmerge: out must be contiguous"):
        atme_unmerge_triton(x[:, :1 + 2 * 4], (4, 4), "h", 1, out=torch.empty(1, 8, 17).transpose(1, 2))


@requires_cuda
def test_cuda_out_variants_write_every_element():
    x, metric, size = (t.float().cuda() for t in make_inputs(2, 197, 96, 64, True))
    ref, ref_size = tome_merge_ref(x, metric, 50, size)
    out, size_out = poisoned_like(ref), poisoned_like(ref_size)
    torch.ops.dcvit.tome_merge.out(x, metric, 50, size, True, False, out=out, size_out=size_out)
    torch.testing.assert_close((out, size_out), (ref, ref_size))
    ref, ref_size, _ = atme_merge_ref(x, metric, (14, 14), "w", 1, size)
    out, size_out = poisoned_like(ref), poisoned_like(ref_size)
    torch.ops.dcvit.atme_merge.out(x, metric, 14, 14, "w", 1, size, out=out, size_out=size_out)
    torch.testing.assert_close((out, size_out), (ref, ref_size))
    full = poisoned_like(x)
    torch.ops.dcvit.atme_unmerge.out(ref, 14, 14, "w", 1, out=full)
    assert torch.equal(full, atme_unmerge_ref(ref, (14, 14), "w", 1))


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=requires_interpreter)])
def test_opcheck(backend):
    x, metric, size = (t.float() for t in make_inputs(2, 37, 16, 16, True))
    prefix = "" if backend == "cpu" else "_triton_"
    tome = getattr(torch.ops.dcvit, prefix + "tome_merge").default
    atme = getattr(torch.ops.dcvit, prefix + "atme_merge").default
    unmerge = getattr(torch.ops.dcvit, prefix + "atme_unmerge").default
    for s in (size, None):
        torch.library.opcheck(tome, (x, metric, 10, s, True, True))
        torch.library.opcheck(atme, (x, metric, 7, 5, "h", 2, s))
    torch.library.opcheck(unmerge, (x[:, :2 + 7 * 3], 7, 5, "w", 2))


def test_torch_compile_fullgraph():
    backend = "cpu"
    x, metric, size = (t.float() for t in make_inputs(2, 65, 16, 8, True))

    class MergeTwice(torch.nn.Module):
        def forward(self, tokens, keys, sizes):
            merged, merged_size, grid = ops.atme_merge(tokens, keys, (8, 8), "w", 1, sizes, backend=backend)
            full = ops.atme_unmerge(merged, (8, 8), "w", 1, backend=backend)
            out, out_size = ops.tome_merge(full * 2, keys, 12, sizes, backend=backend)
            return out, out_size, merged_size

    module = MergeTwice()
    compiled = torch.compile(module, fullgraph=True)
    torch.testing.assert_close(compiled(x, metric, size), module(x, metric, size))


def test_bad_input_is_named():
    x, metric, size = (t.float() for t in make_inputs(1, 65, 8, 4, True))
    with pytest.raises(ValueError, match="r must be an int >= 0"):
        ops.tome_merge(x, metric, -1)
    with pytest.raises(ValueError, match="metric must be"):
        ops.tome_merge(x, metric[:, 1:], 3)
    with pytest.raises(ValueError, match="metric is torch.float64"):
        ops.tome_merge(x, metric.double(), 3)
    with pytest.raises(ValueError, match="size must be"):
        ops.tome_merge(x, metric, 3, size[..., 0])
    with pytest.raises(ValueError, match="distill_token=True needs class_token"):
        ops.tome_merge(x, metric, 3, class_token=False, distill_token=True)
    with pytest.raises(ValueError, match="65 tokens"):
        ops.atme_merge(x, metric, (8, 7), "w")
    with pytest.raises(ValueError, match="axis must be 'w'"):
        ops.atme_merge(x, metric, (8, 8), "x")
    with pytest.raises(ValueError, match="cannot halve axis 'w'"):
        ops.atme_merge(x[:, :9], metric[:, :9], (8, 1), "w")
    with pytest.raises(ValueError, match="grid must be"):
        ops.atme_merge(x, metric, (64,), "w")
    with pytest.raises(ValueError, match="merged grid"):
        ops.atme_unmerge(x, (8, 8), "h")
    with pytest.raises(RuntimeError, match="axis must be 'w' or 'h'"):
        torch.ops.dcvit.atme_merge(x, metric, 8, 8, "d", 1, None)
    with pytest.raises(RuntimeError, match="r must be >= 0"):
        torch.ops.dcvit.tome_merge(x, metric, -2, None, True, False)


# ---- launches per ToMe merge ------------------------------------------------------------

class CountingLauncher:
    """`launch` for tome_merge_triton: counts Triton launches and marks the time
    spent inside them, so that ops the interpreter itself runs are not counted as ours."""

    def __init__(self):
        self.launches, self.inside = [], False

    def __call__(self, kernel):
        counter = self

        class Launch:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    counter.launches.append(kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel))
                    counter.inside = True
                    try:
                        return kernel[grid](*args, **kwargs)
                    finally:
                        counter.inside = False
                return run
        return Launch()


# ATen ops that launch nothing on a GPU: allocations and views.
NO_LAUNCH_OPS = {"empty", "empty_strided", "empty_like", "view", "_unsafe_view", "as_strided",
                 "slice", "select", "expand", "t", "transpose", "unsqueeze", "detach", "alias"}


@requires_interpreter
@pytest.mark.parametrize("class_token,distill_token", [(True, False), (False, False), (True, True)])
def test_tome_triton_merge_is_four_launches_and_no_aten_op(class_token, distill_token):
    """issue 10: match, rank, plan and gather-merge; nothing launches between them. The ATen
    ops the merge issues (outside the Triton kernels) are recorded by a dispatch mode; on a
    GPU every op not in NO_LAUNCH_OPS would be one more launch."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counter = CountingLauncher()

    class RecordOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not counter.inside:
                self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    x, metric, size = (t.float() for t in make_inputs(2, 65, 24, 16, True))
    ref, ref_size = tome_merge_ref(x.double(), metric.double(), 20, size.double(),
                                   class_token, distill_token)
    with RecordOps() as recorder:
        out, out_size = tome_merge_triton(x, metric, 20, size, class_token, distill_token,
                                          launch=counter)
    launching = [op for op in recorder.ops if op not in NO_LAUNCH_OPS]
    assert counter.launches == ["_tome_best_match_kernel", "_tome_rank_kernel",
                                "_tome_plan_kernel", "_weighted_gather_kernel"]
    assert launching == [], f"ATen ops between the kernels: {launching}"
    torch.testing.assert_close((out, out_size), (ref.float(), ref_size.float()))


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_tome_gpu_merge_is_at_most_four_kernels(backend):
    x, metric, size = (t.to(torch.bfloat16).cuda() for t in make_inputs(4, 197, 384, 64, True))
    ops.tome_merge(x, metric, 13, size, backend=backend)  # compile / warm up
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.tome_merge(x, metric, 13, size, backend=backend)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert 1 <= len(kernels) <= 4, kernels
