"""PRACTISE (Wang & Wu, CVPR 2023), DC-ViT's few-shot baseline: drop whole blocks.

1. Block count from the MACs target (structure.plan_block_drop): whole blocks only, so
   the MACs are discrete; by default the count whose MACs are nearest the target
   (rounding="down": at most the target, the paper's rule; "up": at least). The report
   states the achieved MACs.
2. Recoverability of each candidate block: drop it, put a light linear adaptor in its
   place (x + W x + b, starting as the identity), train only the adaptor to mimic the
   teacher's final features on the few-shot images, then measure KL(teacher || student)
   of the outputs on the scoring set (the metric set when one is given, as the DC-ViT
   code does, else the few-shot images). Latency saved is taken as proportional to the
   block's MACs (not measured: all candidate blocks of a ViT cost the same, and a
   measured latency would make the choice depend on timing noise).
   score = recoverability / (% of MACs the block saves); the lowest scores are dropped.
3. The chosen blocks are dropped (the adaptors are not kept: the spec has no place for
   them) and the student is finetuned with DC-ViT's recipe (feature mimicking, AdamW,
   head frozen, blocks up to the one after the last dropped block and the final norm
   trainable), so that the two methods differ only in what they remove.

recipe="official" follows PRACTISE as the DC-ViT code ports it to ViTs (the paper's
baseline; labelled in the report): identity-initialised Linear adaptors after the fc2 of
every earlier block and before the qkv of every later block, trained by SGD (lr 0.02,
momentum 0.9, weight decay 1e-4, StepLR(int(0.4 * iters), 0.1), no loss warm-up); score =
feature MSE on the few-shot images / % of MACs saved; then the same SGD schedule for the
student, every layer but the classifier trainable. Adaptors are not kept in the student.
The learning rates default per recipe (RECIPE_DEFAULTS); a rate passed explicitly is used
as given in either recipe.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn

from ..errors import InputError
from ..presets import LR_RULE, budget_lr
from ..reference import ViTReference
from .fewshot import (
    AUGMENTATIONS,
    augment_flags,
    check_images,
    check_positive,
    kl_to_teacher,
    loss_change,
    predict_logits,
)
from .finetune import feature_mimic_finetune, trainable_up_to
from .run import CliOption, MethodRun, block_list
from .structure import ROUNDING_HELP, ROUNDINGS, plan_block_drop, replace_block


class LinearAdaptorBlock(nn.Module):
    """Stands in for a dropped block while its recoverability is measured: x + W x + b.

    It offers the two residual halves that ViTReference.forward_features calls on a block;
    W and b start at zero, so the untrained adaptor is exactly the dropped block."""
    merge = None

    def __init__(self, dim: int, device, dtype):
        super().__init__()
        self.linear = nn.Linear(dim, dim, device=device, dtype=dtype)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def attention_residual(self, x: torch.Tensor, size) -> torch.Tensor:
        return x

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x)


def with_adaptor(teacher: ViTReference, block: int) -> tuple[ViTReference, LinearAdaptorBlock]:
    """A copy of the teacher with `block` dropped and a fresh linear adaptor in its place."""
    student = replace_block(teacher, block, 0)
    weight = next(teacher.parameters())
    adaptor = LinearAdaptorBlock(teacher.spec.embed_dim, weight.device, weight.dtype)
    student.blocks[block] = adaptor
    return student, adaptor


RECIPES = ("shared", "official")
# what adaptor_lr / lr = None mean per recipe: shared = DC-ViT's AdamW finetuning, official =
# PRACTISE's SGD rates (DC-ViT code's port)
# (the shared recipe's lr None: presets.budget_lr of iters, as DC-ViT's)
RECIPE_DEFAULTS = {"shared": dict(adaptor_lr=1e-3, lr=None), "official": dict(adaptor_lr=0.02, lr=0.02)}

# the options `dcvit compress` offers (defaults: compress_practise's signature)
CLI_OPTIONS = {
    "iters": CliOption("finetuning iterations of the student"),
    "batch_size": CliOption("few-shot batch size"),
    "lr": CliOption(f"learning rate of the finetuning (None: per recipe; official 0.02; shared {LR_RULE})",
                    type=float),
    "candidates": CliOption("blocks that may be dropped (all but the first and the last)",
                            type=block_list, metavar="I,J,..."),
    "adaptor_iters": CliOption("adaptor training iterations per candidate block (None: iters)", type=int),
    "augment": CliOption("few-shot augmentation (shift for digits: no flips)", choices=tuple(AUGMENTATIONS)),
    "rounding": CliOption(ROUNDING_HELP, choices=ROUNDINGS),
    "recipe": CliOption("shared (DC-ViT's finetuning) or official (PRACTISE's adaptors and SGD)",
                        choices=RECIPES),
}


def identity_linear(dim: int, device, dtype) -> nn.Linear:
    linear = nn.Linear(dim, dim, device=device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(dim, device=device, dtype=dtype))
        linear.bias.zero_()
    return linear


def with_official_adaptors(teacher: ViTReference, block: int) -> tuple[ViTReference, list[nn.Parameter]]:
    """A copy of the teacher with `block` dropped and PRACTISE's adaptors as the DC-ViT code
    places them in a ViT: after the fc2 of every earlier block and before the qkv of every
    later block (identity at start, so the untrained student is exactly the dropped block;
    blocks without an MLP or attention get none there)."""
    student = replace_block(teacher, block, 0)
    weight = next(teacher.parameters())
    dim = teacher.spec.embed_dim
    params: list[nn.Parameter] = []
    for index, other in enumerate(student.blocks):
        if index < block and other.mlp is not None:
            adaptor = identity_linear(dim, weight.device, weight.dtype)
            other.mlp.fc2 = nn.Sequential(other.mlp.fc2, adaptor)
        elif index > block and other.attn is not None:
            adaptor = identity_linear(dim, weight.device, weight.dtype)
            other.attn.qkv = nn.Sequential(adaptor, other.attn.qkv)
        else:
            continue
        params += list(adaptor.parameters())
    if not params:
        raise ValueError(f"block {block}: PRACTISE's official adaptors need an MLP before it or "
                         "attention after it")
    return student, params


@torch.no_grad()
def feature_mse(student: ViTReference, teacher: ViTReference, images: torch.Tensor, batch_size: int,
                device) -> float:
    """Mean squared difference of the final features over `images` (eval mode)."""
    total, count = 0.0, 0
    student.eval()
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device)
        diff = student.forward_features(x).float() - teacher.forward_features(x).float()
        total += float(diff.pow(2).sum())
        count += diff.numel()
    return total / count


def compress_practise(model, images: torch.Tensor, target_macs: float, *,
                      metric_set: torch.Tensor | None = None, candidates=None, rounding: str = "nearest",
                      iters: int = 2000,
                      adaptor_iters: int | None = None, adaptor_lr: float | None = None,
                      batch_size: int = 64, lr: float | None = None, weight_decay: float = 1e-4,
                      augment: str = "flip+shift", recipe: str = "shared",
                      score_cache: dict | None = None, device=None,
                      seed: int = 0, checkpoint_dir=None, resume: bool = False,
                      progress: bool = False, report: dict | None = None) -> ViTReference:
    """PRACTISE-compress `model` (timm ViT or ViTReference) to `target_macs`, the fraction of
    its MACs to keep, by dropping whole blocks: the count nearest the target, or at most /
    at least it (rounding "down" / "up"). Returns the student (eval mode).

    adaptor_iters: adaptor training iterations per candidate (default iters; PRACTISE's
    code trains adaptors about as long as it finetunes). augment: a fewshot.AUGMENTATIONS
    name. report, when given, receives achieved_macs (what the dropped blocks give,
    generally off the target), every candidate's score, losses and timings.
    recipe: "shared" (DC-ViT's finetuning, see the module docstring) or "official"
    (PRACTISE's adaptors and SGD, as the DC-ViT code ports it). adaptor_lr / lr: None takes
    the recipe's rate (RECIPE_DEFAULTS: shared 1e-3 / presets.budget_lr(iters), official
    0.02 / 0.02); a given
    rate is always used. score_cache: a dict kept by the caller between calls; a candidate's score does not
    depend on the target, so a sweep over targets scores each block once per setting.
    """
    adaptor_iters = iters if adaptor_iters is None else adaptor_iters
    augmentation = augment_flags(augment)
    if recipe not in RECIPES:
        raise InputError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    official = recipe == "official"
    adaptor_lr = RECIPE_DEFAULTS[recipe]["adaptor_lr"] if adaptor_lr is None else adaptor_lr
    lr = RECIPE_DEFAULTS[recipe]["lr"] if lr is None else lr
    lr = budget_lr(iters) if lr is None else lr
    # official: SGD + StepLR, adaptors with the weight decay, no loss warm-up, no clipping (the
    # port's training loop); shared: DC-ViT's finetuning (AdamW, warm-up, clipping at 1.0)
    optimizer = "sgd" if official else "adamw"
    recipe_settings = dict(optimizer=optimizer, warmup_frac=0.0 if official else 0.01,
                           max_grad_norm=None if official else 1.0)
    check_positive(iters=iters, adaptor_iters=adaptor_iters, batch_size=batch_size)
    run = MethodRun("practise", model, images, target_macs, device=device, progress=progress)
    spec, teacher, device, log = run.spec, run.teacher, run.device, run.log
    if metric_set is not None:
        check_images(metric_set, spec, "metric_set")
    plan = plan_block_drop(spec, target_macs, candidates=candidates, rounding=rounding)
    log(plan.summary().replace("\n", "; "))

    ckpt = run.checkpoint(checkpoint_dir, resume, dict(
        target=plan.target_ratio, blocks=plan.blocks_dropped, candidates=list(plan.candidates), iters=iters,
        adaptor_iters=adaptor_iters, adaptor_lr=adaptor_lr, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, augment=augment, recipe=recipe, seed=seed), metric_set=metric_set)
    config = ckpt.config
    state = ckpt.state
    timings = state.setdefault("timings", {"selection_s": 0.0, "finetune_s": 0.0})
    if ckpt.resumed:
        log(f"resuming from {ckpt.folder}: {len(state.get('scores', {}))} candidate scores done")

    depth = spec.depth
    scoring_set = images if metric_set is None else metric_set
    scoring_logits = predict_logits(teacher, scoring_set, batch_size, device)
    saved_percent = 100.0 * plan.block_macs / plan.teacher_macs  # latency model: proportional to MACs

    scores = state.setdefault("scores", {})
    # everything a candidate's score depends on (not the target, nor the finetuning)
    cache_key = repr({k: config[k] for k in ("adaptor_iters", "adaptor_lr", "batch_size", "augment",
                                             "recipe", "seed", "teacher", "images", "metric_set")})
    cached = {} if score_cache is None else score_cache.setdefault(cache_key, {})
    for block in plan.candidates:
        if str(block) not in scores and str(block) in cached:
            scores[str(block)] = dict(cached[str(block)], seconds=0.0)
            log(f"candidate block {block}: score {scores[str(block)]['score']:.6f} "
                "(computed for another target)")
        if str(block) in scores:
            continue
        start = time.perf_counter()
        if official:
            student, adaptor_params = with_official_adaptors(teacher, block)
        else:
            student, adaptor = with_adaptor(teacher, block)
            adaptor_params = list(adaptor.parameters())
        losses = feature_mimic_finetune(student, teacher, images, iters=adaptor_iters,
                                        batch_size=batch_size, lr=adaptor_lr,
                                        weight_decay=weight_decay if official else 0.0,
                                        trainable=adaptor_params, device=device, seed=seed + 1 + block,
                                        progress=False, **recipe_settings, **augmentation)
        if recipe == "official":  # PRACTISE's recoverability: feature error on the training images
            recoverability = feature_mse(student, teacher, images, batch_size, device)
        else:
            recoverability = kl_to_teacher(student, scoring_set, scoring_logits, batch_size, device)
        seconds = time.perf_counter() - start
        scores[str(block)] = dict(recoverability=recoverability, score=recoverability / saved_percent,
                                  losses=[float(v) for v in losses], seconds=seconds)
        cached[str(block)] = scores[str(block)]
        timings["selection_s"] += seconds
        ckpt.commit()
        log(f"candidate block {block}: recoverability (KL) {recoverability:.5f}, "
            f"score {recoverability / saved_percent:.6f} ({seconds:.1f} s)")
    ranking = sorted(plan.candidates, key=lambda b: (scores[str(b)]["score"], b))
    chosen = sorted(ranking[:plan.blocks_dropped])
    state["chosen"] = chosen

    if state.get("finetune") is None:
        start = time.perf_counter()
        student = teacher
        for block in chosen:
            student = replace_block(student, block, 0)
        # official: every layer but the classifier; shared: DC-ViT's front part and final norm
        last_trainable = depth - 1 if recipe == "official" else min(max(chosen) + 1, depth - 1)
        losses = feature_mimic_finetune(student, teacher, images, iters=iters,
                                        batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                                        trainable=trainable_up_to(student, last_trainable, final_norm=True),
                                        device=device, seed=seed + 10_000, progress=progress,
                                        **recipe_settings, **augmentation)
        seconds = time.perf_counter() - start
        state["finetune"] = dict(trainable_up_to=last_trainable, losses=[float(v) for v in losses],
                                 seconds=seconds)
        timings["finetune_s"] += seconds
        ckpt.commit(student)
        log(f"dropped blocks {chosen}, {loss_change('feature MSE', losses)} ({seconds:.1f} s)")
    else:
        student = ckpt.model(device)

    finetune = state["finetune"]
    return run.finish(
        student, report, timings=timings,
        finetune_iters=dict(student=iters, per_step=iters, steps=1,
                            selection=adaptor_iters * len(plan.candidates), per_candidate=adaptor_iters),
        extras=dict(
            plan=plan.to_dict(), recipe=recipe, latency_model="proportional to block MACs (not measured)",
            scoring=("feature MSE on the images (official)" if recipe == "official"
                     else "KL on the scoring set"),
            scoring_set="metric_set" if metric_set is not None else "images", chosen_blocks=chosen,
            block_scores=[dict(block=b, score=scores[str(b)]["score"],
                               recoverability=scores[str(b)]["recoverability"], rank=r, chosen=b in chosen)
                          for r, b in enumerate(ranking)],
            losses=dict(adaptor={str(b): scores[str(b)]["losses"] for b in ranking},
                        finetune=finetune["losses"]),
            steps=[dict(blocks=chosen, trainable_up_to=finetune["trainable_up_to"],
                        seconds=finetune["seconds"], first_loss=finetune["losses"][0],
                        last_loss=finetune["losses"][-1])]))
