"""ToMe (Bolya et al., ICLR 2023): training-free bipartite token merging, the reference
that the trained methods are compared with.

Every block merges r tokens after its attention residual (MergeSpec kind "tome") and
attention is proportional (spec.prop_attn: + log(size) per key), as ToMe's timm patch
does. The weights are not touched. The schedule is ToMe's `parse_r`:
  constant:   r in every block;
  decreasing: ToMe's (r, -1) schedule, r_i = int(2r - 2r * i / (L - 1)), i.e. 2r -> 0.
ToMe clamps r at run time to (tokens - protected) // 2; here the clamp is written into the
spec (a block that would merge nothing gets no merge), so the spec states what runs.
A MACs target picks r by bisection on count_macs: the smallest r whose model is at or
under the target (the tokens entering every block, and so the MACs, never grow with r).
"""
from __future__ import annotations

import copy

from ..errors import InputError, is_int
from ..kernels.merge_rules import tome_mergeable
from ..macs import count_macs
from ..reference import ViTReference
from ..spec import MergeSpec, ViTSpec
from .run import CliOption, MethodRun
from .structure import check_target_ratio

SCHEDULES = ("constant", "decreasing")


def _check_schedule(schedule) -> str:
    if schedule not in SCHEDULES:
        raise InputError(f"unknown ToMe schedule {schedule!r}; choose one of {SCHEDULES}")
    return schedule


def _check_r(r) -> int:
    if not is_int(r) or r < 0:
        raise InputError(f"ToMe r must be a non-negative integer (tokens merged per block), got {r!r}")
    return r


def parse_r(depth: int, r: int, schedule: str = "constant") -> list[int]:
    """ToMe's per-block r before clamping (tome.utils.parse_r with inflection 0 or -1)."""
    _check_schedule(schedule)
    _check_r(r)
    if depth == 1 or schedule == "constant":
        return [r] * depth
    min_val = int(r * 2.0)      # int(r * (1 - inflect)) with inflect = -1
    max_val = 2 * r - min_val   # = 0
    step = (max_val - min_val) / (depth - 1)
    return [int(min_val + step * i) for i in range(depth)]


def _check_base(spec: ViTSpec) -> None:
    if any(b.merge is not None for b in spec.blocks):
        raise InputError("the model already merges tokens; ToMe starts from a model without "
                         "token merging")
    if spec.rope is not None:
        raise InputError("ToMe is not supported on a RoPE model yet (a merged token's rotary "
                         "position is not defined)")


def tome_spec(spec: ViTSpec, r: int, schedule: str = "constant") -> ViTSpec:
    """`spec` with ToMe merges (clamped per block as ToMe does) and proportional attention."""
    _check_base(spec)
    out = copy.deepcopy(spec)
    prefix = spec.num_prefix_tokens
    tokens = prefix + spec.num_patches
    for block, r_i in zip(out.blocks, parse_r(spec.depth, r, schedule)):
        r_i = min(r_i, tome_mergeable(tokens, prefix))
        block.merge = MergeSpec(kind="tome", r=r_i) if r_i > 0 else None
        tokens -= r_i
    out.prop_attn = True
    return out.validate()


def max_useful_r(spec: ViTSpec, schedule: str = "constant") -> int:
    """An r beyond which the clamped schedule no longer changes (every merging block saturated)."""
    # the most any block can merge (the first, with all tokens)
    mergeable = tome_mergeable(spec.num_prefix_tokens + spec.num_patches, spec.num_prefix_tokens)
    if _check_schedule(schedule) == "constant" or spec.depth == 1:
        return mergeable
    # decreasing: block i < L-1 merges int(2r (L-1-i) / (L-1)) >= mergeable once r >= mergeable (L-1)
    return mergeable * (spec.depth - 1)


def r_for_target(spec: ViTSpec, target_macs: float, schedule: str = "constant") -> int:
    """The smallest r whose ToMe model keeps at most `target_macs` of the teacher's MACs."""
    rho = check_target_ratio(target_macs)
    _check_base(spec)
    teacher = count_macs(spec).total
    budget = rho * teacher

    def macs(r: int) -> int:
        return count_macs(tome_spec(spec, r, schedule)).total

    low, high = 0, max_useful_r(spec, schedule)
    if macs(high) > budget:
        smallest = macs(high) / teacher
        raise InputError(f"target {rho} is out of ToMe's reach for this model: merging as many "
                         f"tokens as possible ({schedule} schedule, r = {high}) keeps "
                         f"{smallest:.4f} of the MACs; choose a target >= {smallest:.4f} or "
                         "another method")
    while high - low > 1:  # invariant: macs(low) > budget >= macs(high) (macs(0) is the teacher's)
        mid = (low + high) // 2
        if macs(mid) <= budget:
            high = mid
        else:
            low = mid
    return high


# the options `dcvit compress` offers (defaults: compress_tome's signature)
CLI_OPTIONS = {
    "schedule": CliOption("ToMe's r schedule", choices=SCHEDULES),
}


def compress_tome(model, images=None, target_macs: float | None = None, *, r: int | None = None,
                  schedule: str = "constant", report: dict | None = None) -> ViTReference:
    """ToMe applied to `model` (timm ViT or ViTReference); training-free, so `images` is not
    used (given ones are checked like every method's). Give either `r` (tokens merged per
    block) or `target_macs` (fraction of the teacher's MACs to keep; r is then found by
    bisection). Returns a new ViTReference (eval mode) with the teacher's weights and a spec
    with the merges and proportional attention; `report`, when given, receives the common
    report (run.py) with r and the per-block merges in its extras."""
    _check_schedule(schedule)
    if (r is None) == (target_macs is None):
        raise InputError("ToMe needs exactly one of r (tokens merged per block) and target_macs "
                         f"(fraction of MACs to keep); got r={r!r}, target_macs={target_macs!r}")
    run = MethodRun("tome", model, images, target_macs, target_required=False, images_required=False,
                    head_required=False, move=False)
    spec = run.spec
    if r is None:
        r = r_for_target(spec, target_macs, schedule)
    new_spec = tome_spec(spec, _check_r(r), schedule)
    # same tensor names and shapes: only merges change
    student = ViTReference.from_state(new_spec, {k: v.detach().clone()
                                                 for k, v in run.teacher.state_dict().items()})
    r_per_block = [b.merge.r if b.merge is not None else 0 for b in new_spec.blocks]
    return run.finish(student, report, settings=dict(r=r, schedule=schedule),
                      extras=dict(r=r, schedule=schedule, r_per_block=r_per_block))
