"""UVC (Yu et al., ICLR 2022; code VITA-Group/UVC): unified pruning of heads, within-head
channels and MLP neurons plus block skipping, under a MACs budget, by primal-dual search
with distillation; then the hard structure is cut out and finetuned with distillation.

Per block (as uvc_utils.py): s_heads heads and s_neurons MLP neurons removed, r_j channels
removed inside each kept head j. Groups are chosen by weight norms: a head by
||proj.weight[:, head columns]||^2, a channel by its proj column ||proj.weight[:, c]||^2
(a head channel feeds only its proj column, so pruning it removes that v row and column),
a neuron by ||fc2.weight[:, j]||^2 (fc1 row and fc2 column go together). Counts go through
a ceil with a straight-through gradient; at least one head, one channel per head and one
neuron stay (UVC's s_ub - 1), so only the block gates remove whole blocks.
Block gates g (init [-1, 1]): keep probability p = gumbel_softmax(g, tau 0.5)[1],
x <- p * Block(x) + (1 - p) * x; a block is skipped when g1 <= g0.

Two gate dynamics (`gates`): "guarded" (the default, this project's rules below) and
"official" (UVC's own: R of the soft Gumbel sample, the gates' gradient = distillation
gradient + 5e-4 * z * dR/dg at every step, one SGD step per 50 iterations on their mean;
every block mixed half and half during the warm-up; proximal step at the weights' lr,
duals at 1e-4; the weights' gradient clipped to norm 1.0; no settle step). docs/METHODS.md
measures both on the demo teacher and says why the default is kept.

Each iteration (uvc_optimizer.py order; gates="guarded"):
  1. proximal shrink of the currently least groups: columns / (1 + 2 * prox_lr * dual);
  2. AdamW step of the weights on the distillation loss (finetune.kd_loss: UVC's weighting,
     KL * T^2 / (batch * classes), alpha 0.1);
  3. SGD on the counts with the resource gradient z * dR/ds plus the duals' pull
     y * (norm of the next group), gradient clipped to 1 in max-norm as UVC; SGD (lr 0.1,
     momentum 0.9, weight decay 1e-4, as UVC) on the gates with the distillation gradient
     plus z * dR/dg while the hard structure is over the budget;
  4. the counts are clamped to their range, then the gates settle (R at those counts): a
     gate this step closed reopens if the budget holds with it open (least sure closure
     first), or if the blocks left open could not carry the budget even at full width (the
     gates never cut more than the whole cut); a gate this step opened closes again if the
     budget does not hold with it open; once the hard structure meets the budget, the
     gates' momentum and z are reset to 0;
  5. dual ascent: y, p on the norms of the least groups, z on R - B; all kept >= 0 (z is the
     dual of R <= B: it grows while over the budget and shrinks to 0 while under it).
During the first warmup_iters steps (UVC: 5 of 30 epochs) only 1 and 2 run: counts, gates
and duals stay where they are, so z does not pile up before the structure can respond.
R is the MACs fraction from the spec's own formula (slicing.WidthCosts, read off
dcvit_engine.macs) of the hard structure: ceil'd counts and the hard keep decision
g1 > g0, each with a straight-through gradient (the keep decision's from the Gumbel-softmax
keep probability). So z rises until the structure the search will hand over -- not its
average over soft gates -- meets the budget, and a gate closes when z * (its block's MACs)
outweighs what the block does for the distillation loss.
Deviations of gates="guarded" from the official code (each needed in a few-shot run of a
few hundred steps; with UVC's own rule, hard R and gates pushed at every step, z kept growing while the counts
caught up, then momentum carried every gate past zero in the same step and all blocks
closed -- 0.069 of the MACs at target 0.5 -- and nothing reopened them):
  - R uses the hard decisions (UVC: the soft Gumbel sample): the soft average is far from
    the structure that is cut out (0.34 vs 0.59 of the MACs measured on a tiny model);
  - the gates get the resource gradient only while the hard structure is over the budget,
    and unweighted (UVC: every step, times --gating_weight);
  - the gates step every iteration, not on UVC's 50-step average of the resource gradient;
  - the settle of step 4 (reopen a needlessly closed gate; reset momentum and z once the
    budget is met) is this project's own: it bounds z and stops momentum closing every
    block together;
  - in step 4, a gate may close only while the blocks still open could meet the budget at
    full width, so skipped blocks never remove more than the cut asked for and the widths
    carry the rest (this project's own). Without it a gate closed whenever the hard
    structure was over the budget, even by little, and at a target between block sizes the
    search skipped a block the widths alone could have spared: the demo teacher (6 blocks,
    0.161 of the MACs each) landed at 0.839 for target 0.9 (and at 0.678 for 0.75 with 200
    search steps), a 4-block model at 0.535 for 0.7. With it: 0.900, 0.750 and 0.699
    (docs/METHODS.md has the table). Measured and not taken: re-opening a skipped block in
    the budget projection (0.900 at 0.9, but the projection then decided 2.05 times the
    cut, and at 0.75 it re-opened the block the gates had closed); UVC's 50-step average
    of the gates' gradient (the gates step once or twice in a few-hundred-step run: their
    margins stayed at 2.0, no block skipped at any target, not even at 0.5 on the 4-block
    model); closing a gate only where that lands nearer the budget than leaving it open
    (the same 0.900 at 0.9, but it can still skip a block the unpruned widths cannot refill);
  - the proximal step and the duals y, p step at 0.05 (UVC: 1e-4, the weights' lr for the
    proximal step), and the weights' gradient is not clipped (UVC: norm 1.0);
  - (both gate modes) z's step size is constant (UVC raises it every few epochs), and UVC's
    clamp of R - B to +-z_grad_clip is not applied.
Few-shot adaptation: counts are learned as fractions of their range (an SGD step moves
at most count_lr of the range), and group norms in the dual terms are relative to their
block's mean, so one set of rates fits every model size.
After the search, the hard structure is projected onto the budget (all pruned fractions
shift by one common amount, counts rounded to the nearest, then the slack is filled by
relative norm per MAC; skipped blocks stay skipped) and sliced
into a smaller spec; the report gives the searched structure's MACs, the final ones, and
the share of the cut that this projection moved (`reallocated_share`).
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from ..errors import InputError
from ..macs import count_macs
from ..reference import ViTReference
from ..spec import AttentionSpec
from .fewshot import check_labels, check_non_negative, check_positive, predict_logits
from .finetune import kd_loss
from .importance import group_scores
from .run import CliOption, MethodRun
from .slicing import BlockMasks, WidthCosts, attention_masks, slice_model, width_costs


@dataclass(frozen=True)
class SearchRates:
    """Step sizes of the primal-dual search (the compress_uvc options of the same names)."""
    lr: float            # AdamW on the weights
    weight_decay: float
    count_lr: float      # SGD on the counts (fractions of their range)
    gate_lr: float       # SGD (momentum 0.9) on the block gates
    budget_lr: float     # dual ascent of z on R - B
    dual_lr: float       # dual ascent of y (heads, neurons) and p (channels)
    prox_lr: float       # proximal shrink step
    tau: float           # Gumbel-softmax temperature of the gates
    gates: str = "guarded"  # GATES: this project's gate rules or the official dynamics


GATES = ("guarded", "official")
# gates="official" (uvc_optimizer.py and the run scripts): the gates' resource gradient is
# z * dR/dg times --gating_weight 5e-4, the gates step once per 50 iterations on the mean
# gradient, and the weights' gradient is clipped to norm 1.0 (--max_grad_norm)
OFFICIAL_GATING_WEIGHT = 5e-4
OFFICIAL_GATING_INTERVAL = 50
OFFICIAL_MAX_GRAD_NORM = 1.0


def _ste_ceil(x: torch.Tensor) -> torch.Tensor:
    return x + (x.ceil() - x).detach()


class _LeastSum(torch.autograd.Function):
    """Sum of the ceil(count) smallest scores; d/dcount = the next smallest (UVC's LeastSsum)."""

    @staticmethod
    def forward(ctx, count, scores):
        k = int(math.ceil(float(count)))
        ordered = scores.sort().values
        ctx.next_value = ordered[min(k, ordered.numel() - 1)]
        return ordered[:k].sum()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.next_value, None


def _check_teacher(spec) -> tuple[int, int, int]:
    """(heads, head_dim, hidden) of a full, uniform ViT; UVC's groups are defined on one."""
    shapes = {(b.attn.num_heads, tuple(b.attn.qk_dims), tuple(b.attn.v_dims), b.mlp_hidden)
              if b.attn is not None else None for b in spec.blocks}
    bad = None in shapes or any(b.merge is not None or b.mlp_hidden == 0 for b in spec.blocks)
    if bad or len(shapes) != 1:
        raise InputError("UVC prunes an uncompressed ViT (every block with all heads of one width, "
                         "an MLP of one width and no token merging); got a compressed spec")
    heads, qk_dims, v_dims, hidden = shapes.pop()
    if qk_dims != v_dims:
        raise InputError("UVC needs heads whose q/k and v widths are equal")
    return heads, qk_dims[0], hidden


class UVCSearch(nn.Module):
    """Counts, gates and dual variables of the search, and the resource function R."""

    def __init__(self, spec, target: float):
        super().__init__()
        self.heads, self.head_dim, self.hidden = _check_teacher(spec)
        depth = spec.depth
        self.costs: WidthCosts = width_costs(spec)
        self.teacher_macs = count_macs(spec).total
        self.target = target
        self.head_frac = nn.Parameter(torch.zeros(depth))
        self.neuron_frac = nn.Parameter(torch.zeros(depth))
        self.channel_frac = nn.Parameter(torch.zeros(depth, self.heads))
        self.gates = nn.Parameter(torch.tensor([[-1.0, 1.0]] * depth))
        self.register_buffer("y_heads", torch.full((depth,), 1e-3))
        self.register_buffer("y_neurons", torch.full((depth,), 1e-3))
        self.register_buffer("p_channels", torch.full((depth, self.heads), 1e-3))
        self.register_buffer("z", torch.tensor(1e-3))

    def counts(self):
        """Removed heads (depth,), channels per head (depth, H), neurons (depth,); ceil with STE."""
        return (_ste_ceil(self.head_frac * (self.heads - 1)),
                _ste_ceil(self.channel_frac * (self.head_dim - 1)),
                _ste_ceil(self.neuron_frac * (self.hidden - 1)))

    def resource(self, keep: torch.Tensor, kept_heads: torch.Tensor) -> torch.Tensor:
        """MACs fraction for the per-block keep values (depth,) (hard 0/1 with a straight-through
        gradient in the search); kept_heads (depth, H) 0/1 says whose channels still count."""
        s_heads, r, s_neurons = self.counts()
        qk_total = self.head_dim * (self.heads - s_heads)
        v_total = qk_total - (r * kept_heads).sum(1)
        hidden = self.hidden - s_neurons
        blocks = [keep[i] * (c_qk * qk_total[i] + c_v * v_total[i] + c_n * hidden[i])
                  for i, (c_qk, c_v, c_n) in enumerate(zip(self.costs.qk, self.costs.v, self.costs.neuron))]
        return (self.costs.fixed + torch.stack(blocks).sum()) / self.teacher_macs

    def full_width_resource(self, open_blocks) -> float:
        """MACs fraction with the blocks where open_blocks is true kept at the teacher's widths
        (the most the widths can give back once the other blocks are skipped)."""
        width = self.heads * self.head_dim
        costs = self.costs
        kept = sum(c_qk * width + c_v * width + c_n * self.hidden
                   for c_qk, c_v, c_n, live in zip(costs.qk, costs.v, costs.neuron, open_blocks)
                   if live)
        return (costs.fixed + kept) / self.teacher_macs


@dataclass
class UVCStructure:
    """The hard result of the search, per block."""
    skip: list[bool]
    heads_removed: list[int]
    channels_removed: list[list[int]]  # per head (by index), applies to kept heads
    neurons_removed: list[int]

    def masks(self, scores) -> list[BlockMasks]:
        """Keep masks choosing the least-norm groups (heads, then channels inside kept heads)."""
        masks = []
        for i, (head_s, col_s, neuron_s) in enumerate(scores):
            heads, head_dim = col_s.shape
            removed_heads = set(head_s.argsort()[:self.heads_removed[i]].tolist())
            v_keep = []
            for h in range(heads):
                keep = torch.ones(head_dim, dtype=col_s.dtype, device=col_s.device)
                if h in removed_heads:
                    keep.zero_()
                else:
                    keep[col_s[h].argsort()[:self.channels_removed[i][h]]] = 0
                v_keep.append(keep)
            m = attention_masks(_uniform_attn(heads, head_dim), [torch.ones_like(k) for k in v_keep], v_keep)
            hidden = torch.ones_like(neuron_s)
            hidden[neuron_s.argsort()[:self.neurons_removed[i]]] = 0
            m.hidden, m.keep_block = hidden, not self.skip[i]
            masks.append(m)
        return masks

    def widths(self, scores, head_dim: int) -> tuple[list[int], list[int], list[int]]:
        """Per block: q/k channels, v channels and MLP neurons left (0 in a skipped block)."""
        qk, v, hidden = [], [], []
        for i, (head_s, _, neuron_s) in enumerate(scores):
            kept = head_s.argsort()[self.heads_removed[i]:].tolist()
            live = not self.skip[i]
            qk.append(live * head_dim * len(kept))
            v.append(live * sum(head_dim - self.channels_removed[i][h] for h in kept))
            hidden.append(live * (neuron_s.numel() - self.neurons_removed[i]))
        return qk, v, hidden

    def macs(self, costs: WidthCosts, scores, head_dim: int) -> int:
        return costs.total(*self.widths(scores, head_dim))


def reallocated_share(searched: UVCStructure, final: UVCStructure, costs: WidthCosts, scores,
                      head_dim: int, teacher_macs: int) -> float:
    """How much of the final cut the budget projection decided rather than the search: the
    MACs of every block's q/k, v and MLP widths that differ between the two structures
    (summed in absolute value), over the MACs the final structure removes."""
    moved = 0
    for kind_costs, a, b in zip((costs.qk, costs.v, costs.neuron), searched.widths(scores, head_dim),
                                final.widths(scores, head_dim)):
        moved += sum(c * abs(x - y) for c, x, y in zip(kind_costs, a, b))
    cut = teacher_macs - final.macs(costs, scores, head_dim)
    return moved / cut if cut > 0 else 0.0


def _uniform_attn(heads: int, head_dim: int) -> AttentionSpec:
    return AttentionSpec(qk_dims=[head_dim] * heads, v_dims=[head_dim] * heads, scale=head_dim ** -0.5)


def _shifted(structure: UVCStructure, shift: float, heads: int, head_dim: int, hidden: int) -> UVCStructure:
    """Every pruned fraction (heads, channels of each head, neurons) moved by `shift` in
    [-1, 1], clipped to its range, rounded to the nearest count: the search's allocation,
    uniformly more or less pruned. (Rounded, not ceil'd: with a ceil any small positive
    shift would remove one more head in every block -- a third of each attention with 3 heads.)"""
    def count(removed: int, most: int) -> int:
        return math.floor(min(max(removed / most + shift, 0.0), 1.0) * most + 0.5) if most else 0
    return UVCStructure(
        skip=list(structure.skip),
        heads_removed=[count(k, heads - 1) for k in structure.heads_removed],
        channels_removed=[[count(r, head_dim - 1) for r in row] for row in structure.channels_removed],
        neurons_removed=[count(n, hidden - 1) for n in structure.neurons_removed])


def _restore_candidates(st: UVCStructure, ordered, costs: WidthCosts, head_dim: int):
    """(relative norm per MAC added, MACs added, kind, block, head) of every removed group that
    can return. Norms are relative to their block's mean of the same kind of group."""
    out = []
    for i, (head_order, cols, neurons) in enumerate(ordered):
        if st.skip[i]:
            continue
        if st.neurons_removed[i] > 0:
            out.append((float(neurons[st.neurons_removed[i] - 1]) / costs.neuron[i], costs.neuron[i],
                        "neuron", i, -1))
        for h in head_order[st.heads_removed[i]:]:
            r = st.channels_removed[i][h]
            if r > 0:
                out.append((float(cols[h, r - 1]) / costs.v[i], costs.v[i], "channel", i, h))
        if st.heads_removed[i] > 0:
            h = head_order[st.heads_removed[i] - 1]
            added = costs.qk[i] * head_dim + costs.v[i] * (head_dim - st.channels_removed[i][h])
            out.append((float(cols[h, st.channels_removed[i][h]:].sum()) / added, added, "head", i, h))
    return out


def fit_to_budget(structure: UVCStructure, scores, costs: WidthCosts, budget: float,
                  gate_margin: list[float], head_dim: int) -> UVCStructure:
    """The searched structure projected onto the budget: every pruned fraction shifts by the
    same amount (bisection on the smallest shift that fits), so the search's allocation across
    blocks and group kinds is kept; if even all-minimal widths do not fit, the live block whose
    gate is least sure is skipped. The slack left is filled greedily with the removed groups of
    the largest relative norm per MAC. Skipped blocks stay skipped."""
    heads, hidden = scores[0][0].numel(), scores[0][2].numel()
    st = _shifted(structure, 0.0, heads, head_dim, hidden)
    while _shifted(st, 1.0, heads, head_dim, hidden).macs(costs, scores, head_dim) > budget:
        live = [i for i, skipped in enumerate(st.skip) if not skipped]
        if not live:
            raise InputError("the MACs budget is below what the patch embedding and the head cost")
        st.skip[min(live, key=lambda i: gate_margin[i])] = True
    low, high = -1.0, 1.0  # macs(shift high) <= budget; find the smallest such shift
    for _ in range(40):
        mid = (low + high) / 2
        if _shifted(st, mid, heads, head_dim, hidden).macs(costs, scores, head_dim) <= budget:
            high = mid
        else:
            low = mid
    st = _shifted(st, high, heads, head_dim, hidden)
    ordered = [(head_s.argsort().tolist(), (col_s / col_s.mean()).sort(dim=1).values,
                (neuron_s / neuron_s.mean()).sort().values) for head_s, col_s, neuron_s in scores]
    macs = st.macs(costs, scores, head_dim)
    while True:
        fitting = [c for c in _restore_candidates(st, ordered, costs, head_dim) if macs + c[1] <= budget]
        if not fitting:
            return st
        _, added, kind, i, h = max(fitting)
        if kind == "neuron":
            st.neurons_removed[i] -= 1
        elif kind == "channel":
            st.channels_removed[i][h] -= 1
        else:
            st.heads_removed[i] -= 1
        macs += added


def gated_logits(model: ViTReference, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The student's logits with block gates: x <- keep_i * Block_i(x) + (1 - keep_i) * x."""
    x = model._pos_embed(model.patch_embed(images))
    if model.norm_pre is not None:
        x = model.norm_pre(x)
    for i, block in enumerate(model.blocks):
        x = torch.lerp(x, block.mlp_residual(block.attention_residual(x, None)), keep[i])
    if model.norm is not None:
        x = model.norm(x)
    return model.forward_head(x)


def _gumbel_keep(gates: torch.Tensor, tau: float, generator: torch.Generator) -> torch.Tensor:
    """Soft Gumbel-softmax sample of the keep probability (index 1), from a private generator."""
    u = torch.rand(gates.shape, generator=generator).clamp(1e-10, 1 - 1e-7).to(gates.device)
    return ((gates - torch.log(-torch.log(u))) / tau).softmax(dim=-1)[:, 1]


class _SearchStep:
    """One primal-dual iteration over the student's weights and the search variables."""

    def __init__(self, student: ViTReference, search: UVCSearch, rates: SearchRates, warmup_iters: int):
        self.student, self.search, self.rates = student, search, rates
        self.warmup_iters, self.iteration = warmup_iters, 0
        self.gate_grads: list[torch.Tensor] = []  # gates="official": the 50-step average
        self.weights = torch.optim.AdamW(student.parameters(), lr=rates.lr,
                                         weight_decay=rates.weight_decay)
        self.counts = torch.optim.SGD([search.head_frac, search.neuron_frac, search.channel_frac],
                                      lr=rates.count_lr)
        self.gates = torch.optim.SGD([search.gates], lr=rates.gate_lr, momentum=0.9, weight_decay=1e-4)

    def scores(self):
        return group_scores(self.student, self.search.heads, self.search.head_dim)

    @torch.no_grad()
    def shrink(self) -> None:
        """Proximal step on the groups the current counts remove (uvc_utils.prox_w)."""
        search, lr, d = self.search, self.rates.prox_lr, self.search.head_dim
        s_heads, r, s_neurons = (c.detach().long().tolist() for c in search.counts())
        for i, (block, (head_s, col_s, neuron_s)) in enumerate(zip(self.student.blocks, self.scores())):
            proj, order = block.attn.proj.weight, head_s.argsort().tolist()
            for h in order[:s_heads[i]]:
                proj[:, h * d:(h + 1) * d] /= 1 + 2 * lr * search.y_heads[i]
            for h in order[s_heads[i]:]:
                proj[:, h * d + col_s[h].argsort()[:r[i][h]]] /= 1 + 2 * lr * search.p_channels[i, h]
            block.mlp.fc2.weight[:, neuron_s.argsort()[:s_neurons[i]]] /= 1 + 2 * lr * search.y_neurons[i]

    def dual_terms(self, scores):
        """sum y * (relative norm of the least groups) per block; the values feed dual ascent."""
        search = self.search
        s_heads, r, s_neurons = search.counts()
        heads_term, neurons_term = [], []
        channels_term = torch.zeros(len(scores), search.heads)
        kept = torch.zeros(len(scores), search.heads)
        for i, (head_s, col_s, neuron_s) in enumerate(scores):
            heads_term.append(_LeastSum.apply(s_heads[i], (head_s / head_s.mean()).cpu()) / search.heads)
            neurons_term.append(_LeastSum.apply(s_neurons[i], (neuron_s / neuron_s.mean()).cpu())
                                / search.hidden)
            for h in head_s.argsort()[int(s_heads[i].detach()):].tolist():
                kept[i, h] = 1
                col = (col_s[h] / col_s[h].mean()).cpu()
                channels_term[i, h] = _LeastSum.apply(r[i, h], col) / search.head_dim
        return torch.stack(heads_term), torch.stack(neurons_term), channels_term, kept

    @torch.no_grad()
    def _settle_gates(self, before: torch.Tensor, kept: torch.Tensor, was_over: bool) -> None:
        """After the gate step: a gate this step closed reopens (its values and momentum as
        before the step) if the structure meets the budget with it open, least sure closure
        first -- gates start alike and move alike, so without this momentum shuts them all
        at once; a gate this step opened stays closed if its block does not fit the budget --
        else the distillation gradient reopens it, z closes it again, and the search cycles.
        Once the hard structure meets the budget, the gates' momentum and z are reset, so the
        push that got it there does not carry it further down."""
        search = self.search
        gates = search.gates
        was_open = before[:, 1] > before[:, 0]
        shut = [i for i in range(len(gates)) if was_open[i] and gates[i, 1] <= gates[i, 0]]
        buffer = self.gates.state[gates].get("momentum_buffer")
        for i in sorted(shut, key=lambda i: float(gates[i, 0] - gates[i, 1])):
            trial = (gates[:, 1] > gates[:, 0]).to(gates.dtype)
            trial[i] = 1
            if float(search.resource(trial, kept)) <= search.target:
                gates[i] = before[i]
                if buffer is not None:
                    buffer[i] = 0
        for i in sorted(shut, key=lambda i: float(gates[i, 0] - gates[i, 1])):
            # a gate may close only while the blocks still open could, at full width, carry
            # the budget: the gates never cut more than the whole cut asked for, so widths
            # can always fill what a closed block leaves (a block bigger than the cut stays open)
            now_open = (gates[:, 1] > gates[:, 0]).tolist()
            if not now_open[i] and search.full_width_resource(now_open) < search.target:
                gates[i] = before[i]
                if buffer is not None:
                    buffer[i] = 0
        opened = [i for i in range(len(gates)) if not was_open[i] and gates[i, 1] > gates[i, 0]]
        for i in opened:  # and a closed gate opens only where the budget has room for its block
            if float(search.resource((gates[:, 1] > gates[:, 0]).to(gates.dtype), kept)) > search.target:
                gates[i] = before[i]
                if buffer is not None:
                    buffer[i] = 0
        if was_over and (float(search.resource((gates[:, 1] > gates[:, 0]).to(gates.dtype), kept))
                         <= search.target):
            if buffer is not None:
                buffer.zero_()
            search.z.zero_()

    def __call__(self, images, teacher_logits, labels, generator) -> dict:
        search, rates = self.search, self.rates
        official = rates.gates == "official"
        warming_up = self.iteration < self.warmup_iters
        self.shrink()
        scores = self.scores()
        if official and warming_up:  # UVC's warm-up mixes every block half and half
            keep = torch.full((len(search.gates),), 0.5)
        else:
            keep = _gumbel_keep(search.gates, rates.tau, generator)
        loss = kd_loss(gated_logits(self.student, images, keep.to(images.device)), teacher_logits, labels)
        heads_term, neurons_term, channels_term, kept = self.dual_terms(scores)
        if official:
            # UVC: R of the soft Gumbel sample; the gates see z * dR/dg times the gating weight
            # (same value, scaled gradient), at every step
            over = True
            resource = search.resource(keep.detach() + OFFICIAL_GATING_WEIGHT * (keep - keep.detach()), kept)
        else:
            # the budget sees the structure that would be cut out now: the hard keep decision,
            # with the Gumbel-softmax keep probability's gradient (straight through)
            hard = (search.gates[:, 1] > search.gates[:, 0]).to(keep.dtype).detach()
            with torch.no_grad():
                over = float(search.resource(hard, kept)) > search.target  # gates pushed only while over
            resource = search.resource(hard + over * (keep - keep.detach()), kept)
        with torch.no_grad():
            soft_resource = search.resource(keep.detach(), kept)
        objective = (loss + search.z * (resource - search.target) + (search.y_heads * heads_term).sum()
                     + (search.y_neurons * neurons_term).sum() + (search.p_channels * channels_term).sum())
        for opt in (self.weights, self.counts, self.gates):
            opt.zero_grad()
        objective.backward()
        for frac in (search.head_frac, search.neuron_frac, search.channel_frac):
            frac.grad.clamp_(-1.0, 1.0)  # UVC: clip_grad_norm_(s, 1.0, inf)
        if official:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), OFFICIAL_MAX_GRAD_NORM)
        self.weights.step()
        self.iteration += 1
        stats = {"loss": float(loss.detach()), "resource": float(resource.detach()),
                 "soft_resource": float(soft_resource), "z": float(search.z)}
        if warming_up:  # UVC: while warming up only the weights learn (and the proximal shrink)
            return stats
        self.counts.step()
        with torch.no_grad():
            for frac in (search.head_frac, search.neuron_frac, search.channel_frac):
                frac.clamp_(0.0, 1.0)
        if official:
            self._official_gate_step()
        else:
            before = search.gates.detach().clone()
            self.gates.step()
            self._settle_gates(before, kept, over)
        with torch.no_grad():
            # z >= 0 (the dual of R <= B): it grows while the structure is over the budget and
            # shrinks, down to 0, while it is under
            search.z.add_(rates.budget_lr * (resource.detach() - search.target)).clamp_(min=0)
            search.y_heads.add_(rates.dual_lr * heads_term.detach()).clamp_(min=0)
            search.y_neurons.add_(rates.dual_lr * neurons_term.detach()).clamp_(min=0)
            search.p_channels.add_(rates.dual_lr * channels_term.detach()).clamp_(min=0)
        return stats

    def _official_gate_step(self) -> None:
        """UVC's gate update: the gates' gradients are collected and, every 50 iterations,
        their mean is one SGD step (the official code weights each by its step's index
        modulo 50, which looks unintended: a plain mean here)."""
        gates = self.search.gates
        self.gate_grads.append(gates.grad.detach().clone())
        if len(self.gate_grads) == OFFICIAL_GATING_INTERVAL:
            gates.grad = torch.stack(self.gate_grads).mean(0)
            self.gates.step()
            self.gate_grads = []
        gates.grad = None


# the options `dcvit compress` offers (defaults: compress_uvc's signature)
CLI_OPTIONS = {
    "iters": CliOption("primal-dual search steps"),
    "finetune_iters": CliOption("distillation steps once the structure is fixed"),
    "batch_size": CliOption("few-shot batch size"),
    "lr": CliOption("AdamW learning rate of the weights (search and distillation)"),
    "gates": CliOption("block gate dynamics: guarded (this project's rules) or official (UVC's)",
                       choices=GATES),
}


# Gate steps (after the warm-up) below which the search is reported as too short for its
# gates to move: a quarter of the default's 167 (200 steps, 33 of them warm-up).
MIN_GATE_STEPS = 40


def compress_uvc(model, images: torch.Tensor, target_macs: float, *, labels: torch.Tensor | None = None,
                 iters: int = 200, finetune_iters: int = 200, batch_size: int = 32, lr: float = 1e-4,
                 weight_decay: float = 0.05, count_lr: float = 0.02, gate_lr: float = 0.1,
                 budget_lr: float = 1.0, dual_lr: float | None = None, prox_lr: float | None = None,
                 tau: float = 0.5, gates: str = "guarded", warmup_iters: int | None = None, device=None,
                 seed: int = 0, checkpoint_dir=None, resume: bool = False, progress: bool = False,
                 report: dict | None = None) -> ViTReference:
    """UVC-compress `model` (timm ViT or ViTReference) to at most `target_macs`, the fraction
    of its MACs to keep, with the few-shot `images` (labels optional: without them the loss
    is pure distillation from the model itself). iters: primal-dual search steps;
    finetune_iters: distillation steps once the structure is fixed; warmup_iters: search
    steps with the block gates fixed (default iters // 6, as UVC's 5 of 30 epochs).
    gates: "guarded" (this project's gate rules, see the module docstring) or "official"
    (UVC's own gate dynamics). dual_lr / prox_lr: None takes the gate mode's rate (guarded
    0.05 each; official 1e-4 for the duals, the weights' lr for the proximal step, as UVC).
    checkpoint_dir / resume: the search and the finetuning are checkpointed steps
    (checkpoint.RunCheckpoint). Returns the student (eval mode); `report`, when given,
    receives the common report (run.py) with, in its extras, the searched and final
    structure, the searched structure's MACs, the final gate margins g1 - g0 and the
    reallocated share."""
    check_positive(iters=iters, batch_size=batch_size)
    if gates not in GATES:
        raise ValueError(f"gates must be one of {', '.join(GATES)}, got {gates!r}")
    official = gates == "official"
    dual_lr = (1e-4 if official else 0.05) if dual_lr is None else dual_lr
    prox_lr = (lr if official else 0.05) if prox_lr is None else prox_lr
    warmup_iters = iters // 6 if warmup_iters is None else warmup_iters
    if isinstance(warmup_iters, bool) or not isinstance(warmup_iters, int) or not 0 <= warmup_iters < iters:
        raise InputError(f"warmup_iters must be an integer in [0, iters), got {warmup_iters!r}")
    check_non_negative(finetune_iters=finetune_iters)
    run = MethodRun("uvc", model, images, target_macs, device=device, progress=progress)
    rho, teacher, device, log = run.target_ratio, run.teacher, run.device, run.log
    check_labels(labels, images)
    search = UVCSearch(run.spec, rho)
    budget = rho * search.teacher_macs
    if budget < search.costs.fixed:
        raise InputError(f"target {rho} is below what the patch embedding and the head alone cost "
                         f"({search.costs.fixed / search.teacher_macs:.4f} of the MACs)")
    ckpt = run.checkpoint(checkpoint_dir, resume, dict(
        target=rho, iters=iters, finetune_iters=finetune_iters, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, count_lr=count_lr, gate_lr=gate_lr, budget_lr=budget_lr, dual_lr=dual_lr,
        prox_lr=prox_lr, tau=tau, gates=gates, warmup_iters=warmup_iters, seed=seed), labels=labels)

    def primal_dual_search():
        teacher_logits = predict_logits(teacher, images, batch_size, device)
        student = copy.deepcopy(teacher).train()
        rates = SearchRates(lr=lr, weight_decay=weight_decay, count_lr=count_lr, gate_lr=gate_lr,
                            budget_lr=budget_lr, dual_lr=dual_lr, prox_lr=prox_lr, tau=tau, gates=gates)
        step = _SearchStep(student, search, rates, warmup_iters)
        generator = torch.Generator().manual_seed(seed)
        history = []
        start_gates = search.gates.detach().clone()
        for it in range(iters):
            idx = torch.randint(images.shape[0], (min(batch_size, images.shape[0]),), generator=generator)
            history.append(step(images[idx].to(device), teacher_logits[idx].to(device),
                                None if labels is None else labels[idx].to(device), generator))
            if (it + 1) % max(1, iters // 10) == 0:
                log(f"search step {it + 1}/{iters}: loss {history[-1]['loss']:.4f}, "
                    f"MACs fraction {history[-1]['resource']:.4f} (target {rho}), z {history[-1]['z']:.3f}")
        scores = step.scores()
        s_heads, r, s_neurons = (c.detach().long().tolist() for c in search.counts())
        logits = search.gates.detach()
        searched = UVCStructure(skip=[bool(g[1] <= g[0]) for g in logits], heads_removed=s_heads,
                                channels_removed=r, neurons_removed=s_neurons)
        margins = (logits[:, 1] - logits[:, 0]).tolist()
        final = fit_to_budget(searched, scores, search.costs, budget, margins, search.head_dim)
        searched_macs = searched.macs(search.costs, scores, search.head_dim)
        moved = reallocated_share(searched, final, search.costs, scores, search.head_dim,
                                  search.teacher_macs)
        student = slice_model(student, final.masks(scores))
        fitted = count_macs(student.spec).total / search.teacher_macs
        log(f"searched structure {searched_macs / search.teacher_macs:.4f} of the MACs "
            f"({sum(searched.skip)} blocks skipped), fitted {fitted:.4f} "
            f"({moved:.1%} of the cut moved by the fit)")
        gate_steps, shift = iters - warmup_iters, float((logits - start_gates).abs().max())
        if gate_steps < MIN_GATE_STEPS:  # the share above then describes the fit, not a search
            log(f"the search ran {gate_steps} steps with its gates free (after {warmup_iters} warm-up "
                f"steps), too few for them to move (largest gate change {shift:.3f}): the structure is "
                f"mostly the fit's; give --iters {MIN_GATE_STEPS + warmup_iters} or more for a real search")
        return student, dict(searched=asdict(searched), searched_macs=searched_macs, final=asdict(final),
                             gate_margins=margins, reallocated_share=moved, search_history=history)

    student, searched = run.step(ckpt, "search", primal_dual_search)
    return run.distill_and_finish(ckpt, student, report, labels, iters=finetune_iters, selection=iters,
                                  batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed + 1,
                                  extras=dict(searched, warmup_iters=warmup_iters, gates=gates))
