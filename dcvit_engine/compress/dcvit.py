"""DC-ViT (Zhang et al., CVPR 2024): few-shot dense compression of a ViT.

1. Structure from the MACs target (structure.plan_dcvit): N blocks lose their attention
   and keep an MLP of one new hidden width, reusing the teacher's fc1 rows / fc2 columns
   of a subset of neurons (random, the official default, or the highest mean post-GELU
   activation on the few-shot images).
2. Block selection on a synthetic metric set: each candidate block alone is compressed
   and finetuned for as many iterations as a progressive step (the official code's
   full-length scoring: shorter scoring picked a collapsing block set on one digits seed
   in five); its score is KL(teacher || student) on the metric set (lower = more
   recoverable). The N best blocks are compressed, in score order.
3. Progressive pruning: one block at a time, each followed by feature-mimicking finetuning
   (MSE to the teacher's final features, head frozen, only the blocks up to the one after
   the latest compressed block trainable, and the final norm, as in the official code).
Every finished candidate score and every progressive step is checkpointed when a
checkpoint folder is given, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import time

import torch

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
    mean_mlp_activations,
    predict_logits,
)
from .finetune import feature_mimic_finetune, trainable_up_to
from .metric_set import synthesize_metric_set
from .run import CliOption, MethodRun, block_list
from .structure import MACS_CONVENTIONS, plan_dcvit, replace_block

NEURON_SELECTIONS = ("random", "activation")

# the options `dcvit compress` offers (defaults: compress_dcvit's signature)
CLI_OPTIONS = {
    "iters": CliOption("finetuning iterations per progressive step"),
    "batch_size": CliOption("few-shot batch size"),
    "lr": CliOption(f"AdamW learning rate of the finetuning (None: {LR_RULE})", type=float),
    "num_blocks": CliOption("compress N blocks instead of the fewest that reach the target (more blocks "
                            "keep wider MLPs)", type=int, metavar="N"),
    "candidates": CliOption("blocks that may be compressed (all but the first and the last)",
                            type=block_list, metavar="I,J,..."),
    "round_to": CliOption("round the hidden width to a multiple of 8 or 64 (the MACs it costs are reported)",
                          type=int, choices=(8, 64), flag="--round"),
    "select_iters": CliOption("finetuning iterations per candidate block while scoring (None: iters)",
                              type=int),
    "neuron_selection": CliOption("which MLP neurons a compressed block keeps: random (the official default) "
                                  "or the highest mean GELU activation on the images",
                                  choices=NEURON_SELECTIONS),
    "metric_size": CliOption("synthetic metric-set images"),
    "metric_iters": CliOption("optimisation steps synthesising the metric set"),
    "augment": CliOption("few-shot augmentation (shift for digits: no flips; official: the DC-ViT "
                         "scripts' RandomResizedCrop + RandAugment rand-m9 + colour jitter 0.3)",
                         choices=tuple(AUGMENTATIONS)),
    "macs_convention": CliOption("how the structure formula counts MACs: full (every matmul) or official "
                                 "(the DC-ViT code's count, without QK^T and A.V)", choices=MACS_CONVENTIONS),
    "max_grad_norm": CliOption("clip the finetuning gradients to this norm (the official 1.0)", type=float),
}


def keep_neurons(selection: str, block: int, hidden: int, keep: int, seed: int,
                 activations: dict[int, torch.Tensor] | None) -> torch.Tensor:
    """Sorted indices of the `keep` hidden neurons of `block` that the compressed MLP reuses."""
    if selection == "random":
        generator = torch.Generator().manual_seed(seed * 1_000_003 + block)
        chosen = torch.randperm(hidden, generator=generator)[:keep]
    else:
        chosen = torch.argsort(activations[block], descending=True, stable=True)[:keep]
    return chosen.sort().values


def compress_dcvit(model, images: torch.Tensor, target_macs: float, *,
                   metric_set: torch.Tensor | None = None, num_blocks: int | None = None,
                   candidates=None, round_to: int | None = None, neuron_selection: str = "random",
                   iters: int = 2000, select_iters: int | None = None, batch_size: int = 64,
                   lr: float | None = None, weight_decay: float = 1e-4, metric_size: int = 50,
                   metric_iters: int = 2000, augment: str = "flip+shift", macs_convention: str = "full",
                   max_grad_norm: float | None = 1.0, device=None, seed: int = 0, checkpoint_dir=None,
                   resume: bool = False, progress: bool = False, report: dict | None = None) -> ViTReference:
    """DC-ViT-compress `model` (timm ViT or ViTReference) to `target_macs`, the fraction of
    its MACs to keep. Returns the student (a new ViTReference, eval mode).

    images: the few-shot images (N, C, H, W), labels not needed. metric_set: prepared
    metric-set images (default: synthesized from the teacher, cached in checkpoint_dir).
    iters: finetuning iterations per progressive step. select_iters: finetuning iterations
    per candidate during block selection (default iters, as the official code). augment:
    a fewshot.AUGMENTATIONS name ("shift" for digits: no flips). macs_convention: how the
    structure formula counts MACs ("full": every matmul; "official": the DC-ViT code's count
    without QK^T and A.V, which gives its widths; target_macs is then in that count too).
    max_grad_norm: the finetuning gradients' norm is clipped to it (official 1.0; None: no
    clipping). checkpoint_dir / resume:
    see checkpoint.RunCheckpoint. report, when given, receives the common report (run.py);
    its extras hold the plan, every candidate's score, the chosen blocks and the losses.
    """
    if neuron_selection not in NEURON_SELECTIONS:
        raise InputError(f"neuron_selection must be one of {NEURON_SELECTIONS}, got {neuron_selection!r}")
    select_iters = iters if select_iters is None else select_iters
    lr = budget_lr(iters) if lr is None else lr  # presets.py: the paper's 3e-5 under-trains few iterations
    augmentation = augment_flags(augment)
    check_positive(iters=iters, select_iters=select_iters, batch_size=batch_size,
                   metric_size=metric_size, metric_iters=metric_iters)
    run = MethodRun("dcvit", model, images, target_macs, device=device, progress=progress)
    spec, teacher, device, log = run.spec, run.teacher, run.device, run.log
    if metric_set is not None:
        check_images(metric_set, spec, "metric_set")
    plan = plan_dcvit(spec, target_macs, num_blocks=num_blocks, candidates=candidates, round_to=round_to,
                      macs_convention=macs_convention)
    log(plan.summary().replace("\n", "; "))

    ckpt = run.checkpoint(checkpoint_dir, resume, dict(
        target=plan.target_ratio, blocks=plan.blocks_compressed, hidden=plan.hidden_width,
        candidates=list(plan.candidates), neuron_selection=neuron_selection, iters=iters,
        select_iters=select_iters, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        augment=augment, macs_convention=macs_convention, max_grad_norm=max_grad_norm, seed=seed,
        metric_size=metric_size if metric_set is None else None,
        metric_iters=metric_iters if metric_set is None else None), metric_set=metric_set)
    state = ckpt.state
    timings = state.setdefault("timings", {"metric_set_s": 0.0, "selection_s": 0.0, "progressive_s": 0.0})
    if ckpt.resumed:
        log(f"resuming from {ckpt.folder}: {len(state.get('scores', {}))} candidate scores and "
            f"{len(state.get('steps', []))} progressive steps done")

    depth = spec.depth
    finetune = dict(batch_size=batch_size, lr=lr, weight_decay=weight_decay, device=device,
                    max_grad_norm=max_grad_norm, **augmentation)

    activations = None
    if neuron_selection == "activation":
        activations = mean_mlp_activations(teacher, images, plan.candidates, batch_size, device)

    def compress_block(model, block):
        neurons = keep_neurons(neuron_selection, block, plan.teacher_hidden, plan.hidden_width,
                               seed, activations)
        return replace_block(model, block, plan.hidden_width, neurons)

    # ---- block selection: one candidate at a time, each checkpointed ----------------------
    scores = state.setdefault("scores", {})
    pending = [b for b in plan.candidates if str(b) not in scores]
    if pending:  # a resumed run past the selection needs no metric set
        start = time.perf_counter()
        if metric_set is None:
            metric_set = synthesize_metric_set(teacher, num_images=metric_size, iters=metric_iters,
                                               img_size=spec.img_size, seed=seed,
                                               cache_path=ckpt.metric_set_path, progress=progress).images
            timings["metric_set_s"] += time.perf_counter() - start
        state["metric_set_size"] = int(metric_set.shape[0])
        metric_logits = predict_logits(teacher, metric_set, batch_size, device)
    for block in pending:
        start = time.perf_counter()
        student = compress_block(teacher, block)
        trainable = trainable_up_to(student, min(block + 1, depth - 1), final_norm=True)
        losses = feature_mimic_finetune(student, teacher, images, iters=select_iters, trainable=trainable,
                                        seed=seed + 1 + block, progress=False, **finetune)
        score = kl_to_teacher(student, metric_set, metric_logits, batch_size, device)
        seconds = time.perf_counter() - start
        scores[str(block)] = dict(score=score, losses=[float(v) for v in losses], seconds=seconds)
        timings["selection_s"] += seconds
        ckpt.commit()
        log(f"candidate block {block}: KL {score:.5f} after {select_iters} iterations ({seconds:.1f} s)")
    ranking = sorted(plan.candidates, key=lambda b: (scores[str(b)]["score"], b))
    chosen = ranking[:plan.blocks_compressed]
    state["chosen"] = chosen

    # ---- progressive pruning, one block per checkpointed step ----------------------------
    steps = state.setdefault("steps", [])
    student = ckpt.model(device) if steps else teacher
    for block in chosen[len(steps):]:
        start = time.perf_counter()
        student = compress_block(student, block)
        last_trainable = min(max(chosen[:len(steps) + 1]) + 1, depth - 1)
        losses = feature_mimic_finetune(student, teacher, images, iters=iters,
                                        trainable=trainable_up_to(student, last_trainable, final_norm=True),
                                        seed=seed + 10_000 + len(steps), progress=progress, **finetune)
        seconds = time.perf_counter() - start
        steps.append(dict(block=block, trainable_up_to=last_trainable,
                          losses=[float(v) for v in losses], seconds=seconds))
        timings["progressive_s"] += seconds
        ckpt.commit(student)
        log(f"step {len(steps)}/{len(chosen)}: block {block} compressed, "
            f"{loss_change('feature MSE', losses)} ({seconds:.1f} s)")

    return run.finish(
        student, report, timings=timings,
        finetune_iters=dict(student=iters * len(chosen), per_step=iters, steps=len(chosen),
                            selection=select_iters * len(plan.candidates), per_candidate=select_iters),
        extras=dict(
            plan=plan.to_dict(), chosen_blocks=chosen,
            block_scores=[dict(block=b, score=scores[str(b)]["score"], rank=r, chosen=b in chosen)
                          for r, b in enumerate(ranking)],
            losses=dict(selection={str(b): scores[str(b)]["losses"] for b in ranking},
                        progressive=[dict(block=s["block"], losses=s["losses"]) for s in steps]),
            steps=[dict(block=s["block"], trainable_up_to=s["trainable_up_to"], seconds=s["seconds"],
                        first_loss=s["losses"][0], last_loss=s["losses"][-1]) for s in steps],
            metric_set_size=state["metric_set_size"]))
