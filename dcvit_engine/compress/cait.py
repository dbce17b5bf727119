"""CAIT (Wang et al., 2023; arXiv 2309.15755): asymmetric token merging that keeps the 2-D
token grid (ATME) plus consistent "dynamic" channel pruning (CDCP).

The paper's code is not public; this is the project's definition (see docs/METHODS.md):
  - ATME: at chosen blocks, after the attention residual, the grid's column pairs (axis
    "w") or row pairs (axis "h") merge into their first token (dcvit_engine.ops.atme_merge);
    axes alternate, starting with `first_axis`; every source token contributes (weight
    (1 + max(cos, 0)) / 2 >= 1/2: merging, not pruning). The grid stays rectangular, so
    `full_resolution_features` unmerges the last tokens back to the input grid.
  - Where the steps go is set by the budget: token merging is asked for `token_share` of
    the MACs to remove. The candidate plans put k steps evenly from block `start` to the
    end (tokens_per_block gives each plan's token counts, count_macs its MACs); the plan
    whose MACs come closest to that share, while the channels can still reach the target,
    is taken (fewer steps on a tie).
  - CDCP: per block ONE keep mask over the q/k channels, shared by every head (every head
    keeps the same width and positions), and one over the v channels and the projection
    input, also shared; the same consistent-mask idea on the MLP: one keep mask over the
    hidden neurons (fc1 row and fc2 column together). Without the MLP the channels alone
    would have to remove ~78% of the attention's MACs at target 0.5 on DeiT-T (the MLP
    holds two thirds of a block's MACs). Each channel and neuron has a gate logit (init
    from weight norms); the mask is hard (logit > 0) in the forward pass with a
    straight-through sigmoid gradient; the loss is the distillation loss plus
    lambda * (R - B), lambda rising by dual ascent while the MACs fraction R is over the
    budget B. Then the masks are frozen, fitted to the budget by logit order (at least one
    channel of each kind and one neuron per block), sliced, and the student is finetuned
    with distillation (finetune.kd_finetune). Learned once on the frozen weights, then
    fixed: this project's reading of the abstract's "dynamic" (nothing changes per input).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..errors import InputError
from ..macs import count_macs
from ..ops import atme_unmerge
from ..reference import ViTReference
from ..spec import ATME_AXES, MergeSpec, ViTSpec, atme_merged_grid, merge_schedule
from .fewshot import check_labels, check_non_negative, check_positive, predict_logits
from .finetune import kd_loss
from .importance import channel_scores, neuron_scores
from .run import CliOption, MethodRun
from .slicing import BlockMasks, WidthCosts, apply_masks, qk_whole_reason, slice_model, width_costs


def _check_teacher(spec: ViTSpec) -> None:
    for i, b in enumerate(spec.blocks):
        if b.merge is not None:
            raise InputError("CAIT starts from a model without token merging")
        if b.attn is not None and (len(set(b.attn.qk_dims)) != 1 or b.attn.qk_dims != b.attn.v_dims):
            raise InputError(f"block {i}: CDCP shares one channel mask across heads and needs heads of "
                             f"one width, got q/k {b.attn.qk_dims}, v {b.attn.v_dims}")


def atme_spec(spec: ViTSpec, layers, first_axis: str = "w") -> ViTSpec:
    """`spec` with an ATME step after the attention of each block in `layers`; axes alternate
    from `first_axis`, taking the other axis when the due one has a single row/column."""
    out = copy.deepcopy(spec)
    rows, cols = spec.grid
    axis = first_axis
    for i in sorted(layers):
        if (cols if axis == "w" else rows) < 2:
            axis = "h" if axis == "w" else "w"
        if (cols if axis == "w" else rows) < 2:
            raise InputError(f"ATME cannot merge at block {i}: the grid is already {rows} x {cols}")
        out.blocks[i].merge = MergeSpec(kind="atme", axis=axis)
        rows, cols = atme_merged_grid((rows, cols), axis)
        axis = "h" if axis == "w" else "w"
    return out.validate()


def candidate_plans(spec: ViTSpec) -> list[tuple[int, ...]]:
    """ATME layer sets: k steps spread evenly from block `start` to the end, every k and start
    the grid allows, plus no merging at all."""
    if spec.rope is not None:
        return [()]  # no ATME on RoPE models yet (compress_cait says so unless token_share is 0)
    rows, cols = spec.grid
    max_steps = (rows - 1).bit_length() + (cols - 1).bit_length()  # halvings until 1 x 1
    plans = {()}
    for k in range(1, min(max_steps, spec.depth) + 1):
        for start in range(spec.depth - k + 1):
            plans.add(tuple(start + (j * (spec.depth - start)) // k for j in range(k)))
    return sorted(plans, key=lambda p: (len(p), [-i for i in p]))


def _min_channel_macs(spec: ViTSpec) -> int:
    """MACs with one q/k and one v channel per head and one MLP neuron left (CDCP's floor;
    q/k at full width where they must stay whole)."""
    costs = width_costs(spec)
    heads = [b.attn.num_heads if b.attn else 0 for b in spec.blocks]
    qk = [b.attn.qk_total if qk_whole_reason(spec, i) else h
          for i, (b, h) in enumerate(zip(spec.blocks, heads))]
    return costs.total(qk, heads, [min(b.mlp_hidden, 1) for b in spec.blocks])


def plan_atme(spec: ViTSpec, target: float, token_share: float = 0.5, first_axis: str = "w"):
    """(layers, merged spec): the ATME plan closest to the token share of the reduction that
    still lets CDCP reach `target` (fraction of the teacher's MACs)."""
    teacher = count_macs(spec).total
    token_goal = teacher - token_share * (teacher - target * teacher)
    options = []
    for layers in candidate_plans(spec):
        merged = atme_spec(spec, layers, first_axis)
        macs = count_macs(merged).total
        if _min_channel_macs(merged) <= target * teacher:
            options.append((abs(macs - token_goal), len(layers), layers, merged))
    if not options:
        smallest = min(_min_channel_macs(atme_spec(spec, p, first_axis))
                       for p in candidate_plans(spec)) / teacher
        raise InputError(f"target {target} is out of CAIT's reach for this model: even the most "
                         f"merging and one channel per head keep {smallest:.4f} of the MACs; choose "
                         f"a target >= {smallest:.4f}")
    _, _, layers, merged = min(options, key=lambda o: o[:2])
    return layers, merged


def _init_logits(scores: torch.Tensor) -> torch.Tensor:
    # logits 1 +- 0.5: every channel starts kept, the weak ones nearer 0
    return (1 + 0.5 * _standardize(scores.log())).cpu()


class ChannelGates(nn.Module):
    """Gate logits of the shared q/k and v channel masks of every block with attention
    (`logits`) and of the MLP neuron masks of every block with an MLP (`neuron_logits`)."""

    def __init__(self, model: ViTReference, target: float, teacher_macs: int):
        super().__init__()
        spec = model.spec
        self.blocks = [i for i, b in enumerate(spec.blocks) if b.attn is not None]
        self.mlp_blocks = [i for i, b in enumerate(spec.blocks) if b.mlp_hidden > 0]
        self.heads = {i: spec.blocks[i].attn.num_heads for i in self.blocks}
        # per row: q/k keep their full head width (q/k-norm, RoPE: see qk_whole_reason); only
        # the v channels of those blocks are pruned
        self.qk_whole = [qk_whole_reason(spec, i) is not None for i in self.blocks]
        self.costs: WidthCosts = width_costs(spec)
        self.teacher_macs = teacher_macs  # of the unmerged teacher: target is a fraction of it
        self.target = target
        self.depth = spec.depth
        init = [torch.stack([_init_logits(s) for s in scores]) for scores in channel_scores(model)
                if scores is not None]
        self.logits = nn.Parameter(torch.stack(init))  # (blocks with attention, 2, d)
        self.neuron_logits = nn.ParameterList([nn.Parameter(_init_logits(s)) for s in neuron_scores(model)
                                               if s is not None])  # per block with an MLP: (hidden,)
        self.register_buffer("lam", torch.tensor(0.0))

    def hard(self) -> torch.Tensor:
        return (self.logits > 0).to(self.logits.dtype)

    def hard_neurons(self) -> list[torch.Tensor]:
        return [(n > 0).to(n.dtype) for n in self.neuron_logits]

    def masks(self, model: ViTReference, keep: torch.Tensor,
              neuron_keep: list[torch.Tensor] | None = None) -> list[BlockMasks]:
        """BlockMasks from keep (blocks with attention, 2, d): [0] q/k, [1] v, tiled over heads,
        and neuron_keep (per block with an MLP; None keeps every neuron)."""
        masks = [BlockMasks() for _ in model.spec.blocks]
        weight = model.patch_embed.proj.weight  # (pos_embed is None without absolute positions)
        device, dtype = weight.device, weight.dtype
        for row, i in enumerate(self.blocks):
            qk, v = (keep[row, j].repeat(self.heads[i]).to(device, dtype) for j in (0, 1))
            if self.qk_whole[row]:
                qk = torch.ones_like(qk)
            masks[i] = BlockMasks(qkv=torch.cat([qk, qk, torch.ones_like(v)]), proj_in=v)
        for row, i in enumerate(self.mlp_blocks if neuron_keep is not None else []):
            masks[i].hidden = neuron_keep[row].to(device, dtype)
        return masks

    def widths(self, keep: torch.Tensor, neuron_keep: list[torch.Tensor] | None = None):
        """Per block: q/k channels, v channels, MLP neurons (sums of the masks: differentiable)."""
        qk, v = [0] * self.depth, [0] * self.depth
        hidden = [0] * self.depth
        for row, i in enumerate(self.blocks):
            qk[i] = self.heads[i] * (keep.shape[-1] if self.qk_whole[row] else keep[row, 0].sum())
            v[i] = self.heads[i] * keep[row, 1].sum()
        for row, i in enumerate(self.mlp_blocks):
            hidden[i] = self.neuron_logits[row].numel() if neuron_keep is None else neuron_keep[row].sum()
        return qk, v, hidden

    def macs(self, keep: torch.Tensor, neuron_keep: list[torch.Tensor] | None = None) -> torch.Tensor:
        """MACs for the keep masks (differentiable in them)."""
        return self.costs.total(*self.widths(keep, neuron_keep))

    def channel_macs(self, row: int, kind: int) -> int:
        """MACs of one channel: kind 0 q/k, 1 v (row: block with attention), 2 an MLP neuron
        (row: block with an MLP)."""
        if kind == 2:
            return self.costs.neuron[self.mlp_blocks[row]]
        i = self.blocks[row]
        return self.heads[i] * (self.costs.qk[i] if kind == 0 else self.costs.v[i])

    def removed_shares(self, keep: torch.Tensor, neuron_keep: list[torch.Tensor]) -> dict:
        """Share of the attention's channel MACs (q/k, v) and of the MLPs' MACs the masks remove."""
        full = self.widths(torch.ones_like(keep))
        kept = self.widths(keep, neuron_keep)
        costs = (self.costs.qk, self.costs.v, self.costs.neuron)

        def total(widths, kinds):
            return sum(float(c * w) for k in kinds for c, w in zip(costs[k], widths[k]))
        return {"attention": 1 - total(kept, (0, 1)) / total(full, (0, 1)),
                "mlp": 1 - total(kept, (2,)) / total(full, (2,)) if self.mlp_blocks else 0.0}


def _standardize(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std().clamp_min(1e-12) if x.numel() > 1 else torch.zeros_like(x)


def fit_masks(gates: ChannelGates, keep: torch.Tensor, budget: float,
              neuron_keep: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Hard masks at most `budget` MACs: drop the lowest-logit channels and neurons while over
    it, then add back the highest-logit dropped ones that still fit; one q/k and one v
    channel and one neuron per block stay. Returns (keep, neuron_keep)."""
    # one mask row per (block, kind): kinds 0 q/k and 1 v of the attention, 2 the MLP
    rows = {(r, k): keep[r, k].clone() if k or not gates.qk_whole[r] else torch.ones_like(keep[r, k])
            for r in range(keep.shape[0]) for k in (0, 1)}
    logits = {(r, k): gates.logits.detach()[r, k].tolist() for r in range(keep.shape[0]) for k in (0, 1)}
    neuron_keep = gates.hard_neurons() if neuron_keep is None else neuron_keep
    for r, n in enumerate(neuron_keep):
        rows[r, 2] = n.detach().clone()
        logits[r, 2] = gates.neuron_logits[r].detach().tolist()
    macs = float(gates.macs(keep, neuron_keep))
    order = sorted((logits[key][c], key, c) for key in rows for c in range(len(rows[key]))
                   if key[1] or not gates.qk_whole[key[0]])
    for _, key, c in order:
        if macs <= budget:
            break
        if rows[key][c] and rows[key].sum() > 1:
            rows[key][c] = 0
            macs -= gates.channel_macs(*key)
    for _, key, c in reversed(order):
        if not rows[key][c] and macs + gates.channel_macs(*key) <= budget:
            rows[key][c] = 1
            macs += gates.channel_macs(*key)
    keep = torch.stack([torch.stack([rows[r, 0], rows[r, 1]]) for r in range(keep.shape[0])])
    return keep, [rows[r, 2] for r in range(len(neuron_keep))]


def _straight_through(logits: torch.Tensor) -> torch.Tensor:
    soft = logits.sigmoid()
    return soft + ((logits > 0).to(soft.dtype) - soft).detach()


def learn_channel_gates(student: ViTReference, gates: ChannelGates, images, teacher_logits, labels, *,
                        iters: int, batch_size: int, gate_lr: float, budget_lr: float, device,
                        seed: int, log) -> list[dict]:
    """CDCP: learn the gate logits on the distillation loss under the budget (weights frozen)."""
    optimizer = torch.optim.Adam([gates.logits, *gates.neuron_logits], lr=gate_lr)
    generator = torch.Generator().manual_seed(seed)
    student.requires_grad_(False)
    history = []
    for it in range(iters):
        idx = torch.randint(images.shape[0], (min(batch_size, images.shape[0]),), generator=generator)
        keep = _straight_through(gates.logits)  # hard forward, sigmoid gradient
        neuron_keep = [_straight_through(n) for n in gates.neuron_logits]
        with apply_masks(student, gates.masks(student, keep, neuron_keep)):
            logits = student(images[idx].to(device))
        loss = kd_loss(logits, teacher_logits[idx].to(device),
                       None if labels is None else labels[idx].to(device))
        resource = gates.macs(keep, neuron_keep) / gates.teacher_macs
        optimizer.zero_grad()
        (loss + gates.lam * (resource - gates.target)).backward()
        optimizer.step()
        with torch.no_grad():
            gates.lam.add_(budget_lr * (resource.detach() - gates.target)).clamp_(min=0)
        history.append({"loss": float(loss.detach()), "resource": float(resource.detach()),
                        "lambda": float(gates.lam)})
        if (it + 1) % max(1, iters // 10) == 0:
            log(f"gate step {it + 1}/{iters}: loss {history[-1]['loss']:.4f}, MACs fraction "
                f"{history[-1]['resource']:.4f} (target {gates.target})")
    student.requires_grad_(True)
    return history


def full_resolution_features(model: ViTReference, images: torch.Tensor) -> torch.Tensor:
    """forward_features unmerged back to the input grid: (B, prefix + H * W, D), each merged
    token copied to every grid position it stands for (for dense prediction heads)."""
    spec = model.spec
    if any(b.merge is not None and b.merge.kind != "atme" for b in spec.blocks):
        raise InputError("only ATME merges keep the grid; a ToMe-merged model cannot be unmerged")
    tokens = model.forward_features(images)
    for block, (_, _, grid_in) in reversed(list(zip(spec.blocks, merge_schedule(spec)))):
        if block.merge is not None:
            tokens = atme_unmerge(tokens, grid_in, block.merge.axis, spec.num_prefix_tokens)
    return tokens


# the options `dcvit compress` offers (defaults: compress_cait's signature)
CLI_OPTIONS = {
    "iters": CliOption("gate-learning steps of the channel and neuron masks"),
    "finetune_iters": CliOption("distillation steps once the structure is fixed"),
    "batch_size": CliOption("few-shot batch size"),
    "lr": CliOption("AdamW learning rate of the distillation"),
    "token_share": CliOption("share of the MACs reduction asked from token merging"),
}


def compress_cait(model, images: torch.Tensor, target_macs: float, *, labels: torch.Tensor | None = None,
                  token_share: float = 0.5, first_axis: str = "w", iters: int = 200,
                  finetune_iters: int = 200, batch_size: int = 32, lr: float = 1e-4,
                  weight_decay: float = 0.05, gate_lr: float = 0.05, budget_lr: float = 1.0,
                  device=None, seed: int = 0, checkpoint_dir=None, resume: bool = False,
                  progress: bool = False, report: dict | None = None) -> ViTReference:
    """CAIT-compress `model` (timm ViT or ViTReference) to at most `target_macs`, the fraction
    of its MACs to keep, with the few-shot `images` (labels optional: without them the loss
    is pure distillation from the model itself). token_share: share of the MACs to remove
    that token merging is asked for (the channels take the rest); first_axis: "w" or "h";
    iters: gate learning steps; finetune_iters: distillation steps with the structure
    frozen. checkpoint_dir / resume: the search and the finetuning are checkpointed steps
    (checkpoint.RunCheckpoint). Returns the student (eval mode); `report` receives the common
    report (run.py), the ATME plan and the widths in its extras."""
    if (isinstance(token_share, bool) or not isinstance(token_share, (int, float))
            or not 0 <= token_share <= 1):
        raise InputError(f"token_share must be a number in [0, 1] (share of the MACs reduction done by "
                         f"token merging), got {token_share!r}")
    if first_axis not in ATME_AXES:
        raise InputError(f"first_axis must be one of {ATME_AXES}, got {first_axis!r}")
    check_positive(iters=iters, batch_size=batch_size)
    check_non_negative(finetune_iters=finetune_iters)
    run = MethodRun("cait", model, images, target_macs, device=device, progress=progress)
    rho, teacher, device, log = run.target_ratio, run.teacher, run.device, run.log
    _check_teacher(run.spec)
    if run.spec.rope is not None and token_share > 0:
        raise InputError("CAIT's token merging (ATME) is not supported on a RoPE model yet (a merged "
                         "token's rotary position is not defined); pass token_share=0 to prune "
                         "channels only")
    check_labels(labels, images)
    layers, merged = plan_atme(run.spec, rho, token_share, first_axis)
    log(f"ATME after blocks {list(layers)}: {count_macs(merged).total / run.teacher_macs:.4f} "
        f"of the MACs before channel pruning")
    ckpt = run.checkpoint(checkpoint_dir, resume, dict(
        target=rho, token_share=token_share, first_axis=first_axis, iters=iters,
        finetune_iters=finetune_iters, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        gate_lr=gate_lr, budget_lr=budget_lr, seed=seed), labels=labels)

    def search():
        # same tensors as the teacher: only merges differ
        student = ViTReference.from_state(merged, {k: v.detach().clone()
                                                   for k, v in teacher.state_dict().items()})
        teacher_logits = predict_logits(teacher, images, batch_size, device)
        gates = ChannelGates(student, rho, run.teacher_macs)
        history = learn_channel_gates(student, gates, images, teacher_logits, labels, iters=iters,
                                      batch_size=batch_size, gate_lr=gate_lr, budget_lr=budget_lr,
                                      device=device, seed=seed, log=log)
        keep, neuron_keep = fit_masks(gates, gates.hard(), rho * gates.teacher_macs, gates.hard_neurons())
        removed = gates.removed_shares(keep, neuron_keep)
        student = slice_model(student, gates.masks(student, keep, neuron_keep))
        log(f"CDCP removed {removed['attention']:.1%} of the attention channels' MACs and "
            f"{removed['mlp']:.1%} of the MLPs'; {count_macs(student.spec).total / run.teacher_macs:.4f} "
            "of the MACs")
        return student, dict(
            qk_channels=keep[:, 0].sum(1).int().tolist(), v_channels=keep[:, 1].sum(1).int().tolist(),
            mlp_hidden=[int(n.sum()) for n in neuron_keep],
            removed_share=dict(tokens=1 - count_macs(merged).total / run.teacher_macs, **removed),
            gate_history=history)

    student, searched = run.step(ckpt, "search", search)
    return run.distill_and_finish(ckpt, student, report, labels, iters=finetune_iters, selection=iters,
                                  batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed + 1,
                                  extras=dict(atme_layers=list(layers), atme_macs=count_macs(merged).total,
                                              **searched))
