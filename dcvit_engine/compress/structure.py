"""Structure from a MACs target (DC-ViT's flops2structure, PRACTISE's block count) and the
weight surgery that applies it to a reference module.

MACs are this project's count (dcvit_engine.macs: every matmul, QK^T and A.V included),
not the thop count of the DC-ViT code; the formulas are the paper's:
  rho = fraction of the teacher's MACs kept, M = teacher MACs, dM = M (1 - rho),
  A / F = attention-branch / full-MLP MACs of one candidate block,
  N = ceil(dM / (A + F)) blocks lose their attention, and the MLP MACs still to remove,
  dM - N A, are shared equally by those N blocks -> one new hidden width.
plan_dcvit(macs_convention="official") counts M and A as the DC-ViT code's thop does for the
linear layers: without QK^T and A.V (LayerNorm left out in both conventions), which gives the
official widths (DeiT-B: 2304 / 1536 / 1152 for 2 / 3 / 4 blocks at 1 / 2 / 3 blocks' MACs).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import asdict, dataclass

import torch

from ..errors import InputError, is_int
from ..macs import block_macs, count_macs
from ..reference import ViTReference
from ..spec import ViTSpec
from .slicing import mlp_neuron_tensors


@dataclass(frozen=True)
class BlockCost:
    """The MACs a candidate block contributes: A (attention branch) and F (MLP), hidden width H."""
    attn: int
    mlp: int
    hidden: int

    @property
    def per_neuron(self) -> int:
        """MACs of one MLP hidden neuron (fc1 row + fc2 column over all tokens)."""
        return self.mlp // self.hidden


class Plan:
    """The base of every plan (a plan function's result, `dcvit plan`): a frozen dataclass
    with at least target_ratio, teacher_macs, target_macs and macs (the planned model's), and
    `summary()`, lines for a person. It offers the error against the target and JSON data
    (`dcvit plan --json`, the report's extras), which each plan extends with its own keys."""
    method = ""

    @property
    def relative_error(self) -> float:
        """(planned MACs - target MACs) / target MACs."""
        return self.macs / self.target_macs - 1.0

    def to_dict(self) -> dict:
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        data.update(method=self.method, relative_error=self.relative_error,
                    kept_ratio=self.macs / self.teacher_macs, **self._extra_keys())
        return data

    def summary(self) -> str:
        raise NotImplementedError(f"{type(self).__name__} must say what it plans in summary()")

    def _extra_keys(self) -> dict:
        return {}


@dataclass(frozen=True)
class DCViTPlan(Plan):
    """How many blocks lose their attention and the hidden width their MLPs keep."""
    target_ratio: float
    teacher_macs: int
    target_macs: int
    attn_macs: int           # A of one candidate block
    mlp_macs: int            # F of one candidate block
    teacher_hidden: int
    candidates: tuple[int, ...]
    blocks_compressed: int   # N
    min_blocks: int          # ceil(dM / (A + F))
    max_blocks: int          # min(floor(dM / A), number of candidates)
    exact_hidden_width: int  # floor of the width that meets the target
    hidden_width: int        # after rounding (== exact_hidden_width without rounding)
    round_to: int | None
    macs: int                # MACs of the planned model (with rounding)
    unrounded_macs: int      # MACs with exact_hidden_width
    macs_convention: str = "full"  # MACS_CONVENTIONS: how teacher/target/planned MACs are counted

    @property
    def rounding_macs(self) -> int:
        """MACs the rounding adds (negative: removes) compared to the exact width."""
        return self.macs - self.unrounded_macs

    method = "dcvit"

    def _extra_keys(self) -> dict:
        return dict(rounding_macs=self.rounding_macs)

    def summary(self) -> str:
        lines = [
            f"teacher {self.teacher_macs / 1e9:.4f} GMACs; target {self.target_ratio:.4f} "
            f"-> {self.target_macs / 1e9:.4f} GMACs"
            + (" (official count: QK^T and A.V left out)" if self.macs_convention == "official" else ""),
            f"per block: attention {self.attn_macs / 1e9:.4f} GMACs, MLP {self.mlp_macs / 1e9:.4f} "
            f"GMACs (hidden {self.teacher_hidden})",
            f"compress {self.blocks_compressed} of the candidate blocks {list(self.candidates)} "
            f"(feasible: {self.min_blocks}..{self.max_blocks}): attention removed, "
            f"MLP hidden {self.teacher_hidden} -> {self.hidden_width}",
            f"planned {self.macs / 1e9:.4f} GMACs = {self.macs / self.teacher_macs:.4f} of the teacher "
            f"({self.relative_error:+.3%} from the target)",
        ]
        if self.round_to:
            lines.append(f"rounding the hidden width {self.exact_hidden_width} to a multiple of "
                         f"{self.round_to} changes the MACs by {self.rounding_macs / 1e6:+.2f} MMACs "
                         f"({self.rounding_macs / self.target_macs:+.3%} of the target)")
        return "\n".join(lines)


@dataclass(frozen=True)
class BlockDropPlan(Plan):
    """PRACTISE: how many whole blocks to drop; its achievable MACs are discrete."""
    target_ratio: float
    teacher_macs: int
    target_macs: int
    block_macs: int          # A + F of one candidate block
    candidates: tuple[int, ...]
    blocks_dropped: int
    macs: int
    rounding: str = "nearest"  # ROUNDINGS: how the discrete block count meets the target

    method = "practise"

    def _extra_keys(self) -> dict:
        # the core keys of DCViTPlan's, so `dcvit plan --json` reads alike for both
        return dict(blocks_compressed=self.blocks_dropped, hidden_width=0)

    def summary(self) -> str:
        return (f"teacher {self.teacher_macs / 1e9:.4f} GMACs; target {self.target_ratio:.4f} -> "
                f"{self.target_macs / 1e9:.4f} GMACs\n"
                f"drop {self.blocks_dropped} of the candidate blocks {list(self.candidates)} "
                f"({self.block_macs / 1e9:.4f} GMACs each)\n"
                f"achieved {self.macs / 1e9:.4f} GMACs = {self.macs / self.teacher_macs:.4f} of the teacher "
                f"({self.relative_error:+.3%} from the target: whole blocks only, rounded {self.rounding})")


def check_target_ratio(target) -> float:
    """The fraction of MACs to keep, as a float in (0, 1), or a ValueError saying what is wrong."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
        raise InputError(f"target MACs must be a number in (0, 1), the fraction of the teacher's "
                         f"MACs to keep; got {target!r}")
    if not 0 < target < 1:
        raise InputError(f"target MACs {target} is out of range: give the fraction of the teacher's "
                         "MACs to keep, strictly between 0 and 1 (e.g. 0.8)")
    return float(target)


def default_candidates(spec: ViTSpec) -> list[int]:
    """All blocks but the first and the last, as the DC-ViT code does (metric_blks.py)."""
    return list(range(1, spec.depth - 1))


def candidate_cost(spec: ViTSpec, candidates) -> tuple[tuple[int, ...], BlockCost]:
    """Check the candidates (distinct, in range, full blocks, all alike) and return their common cost."""
    candidates = tuple(int(i) for i in candidates)
    if not candidates:
        raise InputError(f"no candidate blocks: a model of depth {spec.depth} has no blocks besides "
                         "the first and the last; pass the candidate blocks explicitly")
    if len(set(candidates)) != len(candidates):
        raise InputError(f"candidate blocks {list(candidates)} contain duplicates")
    costs = {}
    for i in candidates:
        if not 0 <= i < spec.depth:
            raise InputError(f"candidate block {i} does not exist (the model has blocks 0..{spec.depth - 1})")
        block = spec.blocks[i]
        if block.attn is None or block.mlp_hidden == 0 or block.merge is not None:
            raise InputError(f"candidate block {i} is not a full attention + MLP block without token "
                             "merging; only such blocks can be compressed")
        macs = block_macs(spec, i)
        costs[i] = BlockCost(attn=macs.attn, mlp=macs.mlp, hidden=block.mlp_hidden)
    if len(set(costs.values())) != 1:
        detail = ", ".join(f"block {i}: A={c.attn} F={c.mlp}" for i, c in costs.items())
        raise InputError("the structure formula shares one hidden width across blocks and needs "
                         f"candidate blocks of equal cost; got {detail}")
    return candidates, costs[candidates[0]]


def compressed_spec(spec: ViTSpec, blocks, hidden: int) -> ViTSpec:
    """A copy of `spec` whose listed blocks have no attention and an MLP of `hidden` (0 = none)."""
    spec = copy.deepcopy(spec)
    for i in blocks:
        old = spec.blocks[i]
        # the MLP keeps its kind (activation, gate, inner norm): only its width changes
        spec.blocks[i] = dataclasses.replace(old, attn=None, mlp_hidden=hidden)
    return spec.validate()


MACS_CONVENTIONS = ("full", "official")


def _convention_costs(spec: ViTSpec, candidate: int, cost: BlockCost, convention: str
                      ) -> tuple[int, BlockCost]:
    """(teacher MACs, candidate cost) under the MACs convention: "full" (every matmul) or
    "official" (the DC-ViT code's count: QK^T and A.V left out of M and of A)."""
    if convention not in MACS_CONVENTIONS:
        raise ValueError(f"macs_convention must be one of {', '.join(MACS_CONVENTIONS)}, got {convention!r}")
    report = count_macs(spec)
    if convention == "full":
        return report.total, cost
    block = report.blocks[candidate]
    return report.total - report.attention_matmuls, BlockCost(attn=block.qkv + block.proj, mlp=cost.mlp,
                                                              hidden=cost.hidden)


def _round_width(width: int, multiple: int, ceiling: int) -> int:
    """Nearest multiple (ties upwards) that does not exceed the teacher's width."""
    rounded = (width + multiple // 2) // multiple * multiple
    return rounded if rounded <= ceiling else ceiling // multiple * multiple


def plan_dcvit(spec: ViTSpec, target: float, *, num_blocks: int | None = None,
               candidates=None, round_to: int | None = None, macs_convention: str = "full") -> DCViTPlan:
    """The DC-ViT structure that keeps `target` of the teacher's MACs (see the module docstring).

    num_blocks overrides N (it must lie in [ceil(dM/(A+F)), min(floor(dM/A), candidates)]);
    round_to rounds the hidden width to the nearest multiple (8 or 64 suit GEMM tiles).
    macs_convention: "full" (this project's count) or "official" (the DC-ViT code's: no QK^T,
    A.V); target, M, A and the plan's MACs are all in that convention.
    """
    rho = check_target_ratio(target)
    if round_to is not None and (not is_int(round_to) or round_to < 1):
        raise InputError(f"round_to must be a positive integer (e.g. 8 or 64), got {round_to!r}")
    candidates, cost = candidate_cost(spec, default_candidates(spec) if candidates is None else candidates)
    teacher, cost = _convention_costs(spec, candidates[0], cost, macs_convention)
    target_macs = round(rho * teacher)
    removed = teacher - target_macs  # dM
    if removed < cost.attn:
        largest = math.floor((1 - cost.attn / teacher) * 1e4) / 1e4
        raise InputError(f"target {rho} is infeasible: removing a single attention branch already "
                         f"removes {cost.attn / teacher:.2%} of the MACs; the largest feasible "
                         f"target is {largest:.4f}")
    per_block = cost.attn + cost.mlp
    min_blocks = -(-removed // per_block)
    max_blocks = min(removed // cost.attn, len(candidates))
    if min_blocks > len(candidates):
        smallest = math.ceil((1 - len(candidates) * per_block / teacher) * 1e4) / 1e4
        raise InputError(f"target {rho} is infeasible: it needs {min_blocks} compressed blocks but "
                         f"there are only {len(candidates)} candidates {list(candidates)}; the "
                         f"smallest feasible target is {smallest:.4f}")
    if min_blocks > max_blocks:
        # only when A > F (very long token sequences): N attentions remove too much already
        raise InputError(f"target {rho} is infeasible: {min_blocks} blocks are needed to reach it, "
                         f"but removing their attention alone removes more than the target asks")
    if num_blocks is None:
        num_blocks = min_blocks
    elif not is_int(num_blocks) or not min_blocks <= num_blocks <= max_blocks:
        raise InputError(f"cannot compress {num_blocks!r} blocks for target {rho}: the feasible "
                         f"range is {min_blocks}..{max_blocks}")
    mlp_to_remove = removed - num_blocks * cost.attn
    # floor of the exact width, like the paper's int(D * r'); integer math avoids 2.999... -> 2
    exact = cost.hidden - (-(-mlp_to_remove // (num_blocks * cost.per_neuron)))
    exact = max(exact, 0)
    hidden = exact if round_to is None else _round_width(exact, round_to, cost.hidden)
    chosen = candidates[:num_blocks]  # every candidate costs the same, so any N give these MACs

    def planned_macs(width: int) -> int:
        report = count_macs(compressed_spec(spec, chosen, width))
        return report.total - (report.attention_matmuls if macs_convention == "official" else 0)

    return DCViTPlan(
        target_ratio=rho, teacher_macs=teacher, target_macs=target_macs,
        attn_macs=cost.attn, mlp_macs=cost.mlp, teacher_hidden=cost.hidden,
        candidates=candidates, blocks_compressed=num_blocks, min_blocks=min_blocks,
        max_blocks=max_blocks, exact_hidden_width=exact, hidden_width=hidden, round_to=round_to,
        macs=planned_macs(hidden), unrounded_macs=planned_macs(exact), macs_convention=macs_convention,
    )


ROUNDINGS = ("nearest", "down", "up")
ROUNDING_HELP = ("whole blocks give discrete MACs: nearest (default) drops the block count whose MACs are "
                 "nearest the target, down keeps at most the target's MACs, up at least")


def plan_block_drop(spec: ViTSpec, target: float, *, candidates=None,
                    rounding: str = "nearest") -> BlockDropPlan:
    """PRACTISE: how many whole blocks to drop. rounding: "down" drops ceil(dM / (A+F)) (MACs
    at most the target, the paper's rule), "up" floor(dM / (A+F)) (at least the target),
    "nearest" (default) whichever of the two is nearer the target (down on a tie), so a sweep
    row labelled 0.75 is not 0.67. At least one block is dropped in every rounding."""
    rho = check_target_ratio(target)
    if rounding not in ROUNDINGS:
        raise InputError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    candidates, cost = candidate_cost(spec, default_candidates(spec) if candidates is None else candidates)
    teacher = count_macs(spec).total
    target_macs = round(rho * teacher)
    per_block = cost.attn + cost.mlp
    down = -(-(teacher - target_macs) // per_block)
    up = (teacher - target_macs) // per_block
    if rounding == "up" and up < 1:
        raise InputError(f"target {rho} with rounding up is infeasible: dropping one whole block already "
                         f"leaves {1 - per_block / teacher:.4f} of the MACs; give a target at or below "
                         "that, or another rounding")
    if rounding == "nearest":  # |MACs - target| of each count; down wins a tie
        count = min((down, max(up, 1)), key=lambda n: (abs(teacher - n * per_block - target_macs), -n))
    else:
        count = down if rounding == "down" else min(up, len(candidates))
    if count > len(candidates):
        # nearest: a target up to half a block below all candidates dropped still rounds to them
        reach = len(candidates) + (0.5 if rounding == "nearest" else 0.0)
        smallest = math.ceil((1 - reach * per_block / teacher) * 1e4) / 1e4
        raise InputError(f"target {rho} is infeasible: it needs {count} dropped blocks but there are "
                         f"only {len(candidates)} candidates {list(candidates)}; the smallest "
                         f"feasible target is {smallest:.4f}")
    return BlockDropPlan(target_ratio=rho, teacher_macs=teacher, target_macs=target_macs,
                         block_macs=per_block, candidates=candidates, blocks_dropped=count,
                         macs=count_macs(compressed_spec(spec, candidates[:count], 0)).total,
                         rounding=rounding)


def replace_block(model: ViTReference, index: int, hidden: int,
                  neurons: torch.Tensor | None = None) -> ViTReference:
    """A new reference module: block `index` without attention (norm1, attn, ls1 removed; the
    residual stays) and with an MLP reusing the fc1 rows / fc2 columns of `neurons`
    (fc2 bias and norm2, ls2 kept). hidden = 0 drops the whole block. `model` is untouched."""
    spec = model.spec
    old = spec.blocks[index]
    if hidden and (old.mlp_hidden == 0 or neurons is None):
        raise InputError(f"block {index}: keeping {hidden} MLP neurons needs the block's MLP and the "
                         "indices of the neurons to keep")
    if neurons is not None and hidden:
        neurons = torch.as_tensor(neurons, dtype=torch.long).flatten()
        if neurons.numel() != hidden or neurons.unique().numel() != hidden \
                or int(neurons.min()) < 0 or int(neurons.max()) >= old.mlp_hidden:
            raise InputError(f"block {index}: need {hidden} distinct neuron indices in "
                             f"[0, {old.mlp_hidden}), got {neurons.numel()}")
    new_spec = compressed_spec(spec, [index], hidden)
    state = model.state_dict()
    prefix = f"blocks.{index}."
    tensors = {k: v.detach().clone() for k, v in state.items() if not k.startswith(prefix)}
    if hidden:
        # a gated MLP's neuron is a (gate, value) pair: both rows go together, and the inner
        # norm keeps the entries of the kept neurons
        reused = mlp_neuron_tensors(state, prefix, old, neurons)
        tensors.update({k: v.detach().clone() for k, v in reused.items()})
        for name in ("mlp.fc2.bias", "norm2.weight", "norm2.bias", "ls2.gamma"):
            if prefix + name in state:
                tensors[prefix + name] = state[prefix + name].detach().clone()
    student = ViTReference.from_state(new_spec, tensors)
    return student.train(model.training)
