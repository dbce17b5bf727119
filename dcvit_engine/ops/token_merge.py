"""Token merging: ToMe's bipartite merge and CAIT's grid-preserving ATME merge / unmerge.

Both run after a block's attention residual and before its MLP (see dcvit_engine.spec).
`size` (B, N, 1) counts the original tokens each token stands for; proportional attention
adds log(size) to the attention logits. Backends: torch (the *_ref functions of
dcvit_engine.kernels.token_merge), cpu and cuda (torch.ops.dcvit.{tome_merge, atme_merge,
atme_unmerge} from dcvit_engine._C), triton (the *_triton launchers; see ops/define.py).
"""
import torch

from dcvit_engine.errors import is_int
from dcvit_engine.kernels.merge_rules import ATME_AXES
from dcvit_engine.kernels.token_merge import (
    atme_merge_ref,
    atme_merge_triton,
    atme_merged_grid,
    atme_unmerge_ref,
    atme_unmerge_triton,
    tome_effective_r,
    tome_merge_ref,
    tome_merge_triton,
)
from dcvit_engine.ops.checks import check_int, check_like_x
from dcvit_engine.ops.define import OpDef, define_op

# ---- argument checks ----------------------------------------------------------------

def _check_tokens(op, name, t):
    if not isinstance(t, torch.Tensor) or t.dim() != 3:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{op}: {name} must be a (B, N, C) tensor, got {got}")
    if not t.is_floating_point():
        raise ValueError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def _check_metric_and_size(op, x, metric, size):
    _check_tokens(op, "x", x)
    _check_tokens(op, "metric", metric)
    if metric.shape[:2] != x.shape[:2] or metric.shape[2] < 1:
        raise ValueError(f"{op}: metric must be (B, N, Cm) with x's B, N = {tuple(x.shape[:2])}, "
                         f"got {tuple(metric.shape)}")
    if size is not None and (not isinstance(size, torch.Tensor)
                             or tuple(size.shape) != (x.shape[0], x.shape[1], 1)):
        got = tuple(size.shape) if isinstance(size, torch.Tensor) else type(size).__name__
        raise ValueError(f"{op}: size must be (B, N, 1) = {(x.shape[0], x.shape[1], 1)} "
                         f"or None, got {got}")
    check_like_x(op, x, {"metric": (metric, None), "size": (size, None)})


def check_tome_merge_args(x, metric, r, size, class_token, distill_token):
    """Raises ValueError naming the argument that is off."""
    op = "tome_merge"
    _check_metric_and_size(op, x, metric, size)
    check_int(op, "r", r, 0)
    for name, flag in (("class_token", class_token), ("distill_token", distill_token)):
        if not isinstance(flag, bool):
            raise ValueError(f"{op}: {name} must be a bool, got {flag!r}")
    if distill_token and not class_token:
        raise ValueError(f"{op}: distill_token=True needs class_token=True "
                         "(the distillation token follows the class token)")


def _grid_tuple(op, grid, name):
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or any(not is_int(g) or g < 1 for g in grid)):
        raise ValueError(f"{op}: {name} must be (rows, cols) of positive ints, got {grid!r}")
    return int(grid[0]), int(grid[1])


def check_atme_layout(op, x, grid, axis, num_prefix_tokens, merged):
    """Validates grid/axis/prefix against x; returns the grid as a tuple. `merged`: x holds
    the merged grid (unmerge) instead of `grid` itself (merge)."""
    _check_tokens(op, "x", x)
    grid = _grid_tuple(op, grid, "grid_before" if merged else "grid")
    if axis not in ATME_AXES:
        raise ValueError(f"{op}: axis must be 'w' (pairs in each row) or 'h' (pairs of rows), "
                         f"got {axis!r}")
    check_int(op, "num_prefix_tokens", num_prefix_tokens, 0)
    if grid[1 if axis == "w" else 0] < 2:
        raise ValueError(f"{op}: cannot halve axis {axis!r} of grid {grid}: it has length 1")
    layout = atme_merged_grid(grid, axis) if merged else grid
    expected = num_prefix_tokens + layout[0] * layout[1]
    if x.shape[1] != expected:
        what = f"the merged grid {layout} of grid {grid}" if merged else f"the grid {grid}"
        raise ValueError(f"{op}: x has {x.shape[1]} tokens but {num_prefix_tokens} prefix tokens + "
                         f"{what} make {expected}; pass the grid the tokens are laid out in")
    return grid


# ---- the ops ------------------------------------------------------------------------------

def _tome_fake(x, metric, r, size, class_token, distill_token):
    n_out = x.shape[1] - tome_effective_r(x.shape[1], r, class_token, distill_token)
    return x.new_empty((x.shape[0], n_out, x.shape[2])), x.new_empty((x.shape[0], n_out, 1))


def _atme_fake(x, metric, grid_h, grid_w, axis, num_prefix_tokens, size):
    rows, cols = atme_merged_grid((grid_h, grid_w), axis)
    n_out = num_prefix_tokens + rows * cols
    return x.new_empty((x.shape[0], n_out, x.shape[2])), x.new_empty((x.shape[0], n_out, 1))


def _unmerge_fake(x, grid_h, grid_w, axis, num_prefix_tokens):
    return x.new_empty((x.shape[0], num_prefix_tokens + grid_h * grid_w, x.shape[2]))


# The schemas take the grid as two ints and return no grid; the kernels' functions take a
# (rows, cols) grid and ATME's also returns the new grid.
def _atme_ref(x, metric, grid_h, grid_w, axis, num_prefix_tokens, size):
    return atme_merge_ref(x, metric, (grid_h, grid_w), axis, num_prefix_tokens, size)[:2]


def _atme_triton(x, metric, grid_h, grid_w, axis, num_prefix_tokens, size, *, launch):
    return atme_merge_triton(x, metric, (grid_h, grid_w), axis, num_prefix_tokens, size, launch=launch)[:2]


def _unmerge_ref(x, grid_h, grid_w, axis, num_prefix_tokens):
    return atme_unmerge_ref(x, (grid_h, grid_w), axis, num_prefix_tokens)


def _unmerge_triton(x, grid_h, grid_w, axis, num_prefix_tokens, *, launch):
    return atme_unmerge_triton(x, (grid_h, grid_w), axis, num_prefix_tokens, launch=launch)


# Examples for dcvit doctor: a class and a distillation token and a 5 x 7 patch grid.
_EXAMPLE_GRID = (5, 7)


def _tokens_example(generator, channels=24, metric_channels=16):
    tokens = 2 + _EXAMPLE_GRID[0] * _EXAMPLE_GRID[1]
    x = torch.randn(2, tokens, channels, generator=generator, dtype=torch.float64)
    metric = torch.randn(2, tokens, metric_channels, generator=generator, dtype=torch.float64)
    size = 1 + torch.rand(2, tokens, 1, generator=generator, dtype=torch.float64) * 3
    return x, metric, size


def _tome_example(generator):
    x, metric, size = _tokens_example(generator)
    return (x, metric, 11, size, True, True), {}


def _atme_example(generator):
    x, metric, size = _tokens_example(generator)
    return (x, metric, *_EXAMPLE_GRID, "w", 2, size), {}


def _unmerge_example(generator):
    rows, cols = atme_merged_grid(_EXAMPLE_GRID, "h")
    x = torch.randn(2, 2 + rows * cols, 24, generator=generator, dtype=torch.float64)
    return (x, *_EXAMPLE_GRID, "h", 2), {}


# ---- public functions: their signatures and docs; define_op makes the ops from them ----

def _tome_public(x, metric, r, size=None, class_token=True, distill_token=False):
    """ToMe's bipartite soft matching + size-weighted merge; returns (x, size).

    x (B, N, C) tokens, metric (B, N, Cm) similarity features of x's dtype (ToMe: the keys
    averaged over heads), size (B, N, 1) token counts or None (all ones). A = even tokens,
    B = odd tokens; the r A tokens with the most similar B partner are averaged into it.
    The class (and distillation) token is never merged; r is clamped to
    (N - protected) // 2 like ToMe. Output, N - r tokens in ToMe's order: the unmerged A
    tokens (in token order with a class token, else in score order, most similar first, as
    ToMe: the next merge's A/B split depends on it), then the B tokens (class and
    distillation token first). `backend` in {torch, cpu, cuda,
    triton} forces an implementation (else DCVIT_BACKEND, else the device's priority list).
    """
    return x, metric, r, size, class_token, distill_token


def _atme_public(x, metric, grid, axis, num_prefix_tokens=1, size=None):
    """CAIT's asymmetric token merge; returns (x, size, new_grid).

    x (B, P + H*W, C): P prefix tokens, then the (H, W) = grid tokens row-major. axis "w"
    merges columns (2j, 2j+1) of every row (grid -> H x ceil(W/2)), axis "h" rows (2i, 2i+1)
    (-> ceil(H/2) x W). The pair's first token dominates: with s the cosine similarity of
    the pair's metric vectors and w = (1 + max(s, 0)) / 2, size = size_dst + w * size_src,
    alpha = w * size_src / size and merged = (1 - alpha) * x_dst + alpha * x_src; every
    source contributes (a dissimilar one, s <= 0, with half its size). Prefix tokens and an
    odd last column/row pass through.
    """
    grid = _grid_tuple("atme_merge", grid, "grid")
    return x, metric, grid[0], grid[1], axis, num_prefix_tokens, size


def _atme_check(x, metric, grid_h, grid_w, axis, num_prefix_tokens, size):
    check_atme_layout("atme_merge", x, (grid_h, grid_w), axis, num_prefix_tokens, merged=False)
    _check_metric_and_size("atme_merge", x, metric, size)


def _atme_result(out, x, metric, grid_h, grid_w, axis, num_prefix_tokens, size):
    return (*out, atme_merged_grid((grid_h, grid_w), axis))


def _unmerge_public(x, grid_before, axis, num_prefix_tokens=1):
    """Undoes the layout of atme_merge for dense tasks: (B, P + H*W, C) for grid_before =
    (H, W), each merged token copied to both positions it came from."""
    grid = _grid_tuple("atme_unmerge", grid_before, "grid_before")
    return x, grid[0], grid[1], axis, num_prefix_tokens


def _unmerge_check(x, grid_h, grid_w, axis, num_prefix_tokens):
    check_atme_layout("atme_unmerge", x, (grid_h, grid_w), axis, num_prefix_tokens, merged=True)


TOME_MERGE = define_op(OpDef(
    name="tome_merge",
    schema="(Tensor x, Tensor metric, int r, Tensor? size, bool class_token, bool distill_token) "
           "-> (Tensor, Tensor)",
    backends=("torch", "cpu", "cuda", "triton"), reference=tome_merge_ref, fake=_tome_fake,
    triton=tome_merge_triton, check=check_tome_merge_args, public=_tome_public, example=_tome_example,
))
ATME_MERGE = define_op(OpDef(
    name="atme_merge",
    schema="(Tensor x, Tensor metric, int grid_h, int grid_w, str axis, int num_prefix_tokens, "
           "Tensor? size) -> (Tensor, Tensor)",
    backends=("torch", "cpu", "cuda", "triton"), reference=_atme_ref, fake=_atme_fake,
    triton=_atme_triton, check=_atme_check, public=_atme_public, result=_atme_result,
    example=_atme_example,
))
ATME_UNMERGE = define_op(OpDef(
    name="atme_unmerge",
    schema="(Tensor x, int grid_h, int grid_w, str axis, int num_prefix_tokens) -> Tensor",
    backends=("torch", "cpu", "cuda", "triton"), reference=_unmerge_ref, fake=_unmerge_fake,
    triton=_unmerge_triton, check=_unmerge_check, public=_unmerge_public, example=_unmerge_example,
))
TOME_OP, ATME_OP, UNMERGE_OP = TOME_MERGE.name, ATME_MERGE.name, ATME_UNMERGE.name
tome_merge, atme_merge, atme_unmerge = TOME_MERGE.function, ATME_MERGE.function, ATME_UNMERGE.function


def token_merge_backends(x) -> dict[str, dict[str, str | None]]:
    """Each merge op's backends and their reason for refusing x (None: available)."""
    return {op.name: op.reasons(x) for op in (TOME_MERGE, ATME_MERGE, ATME_UNMERGE)}
