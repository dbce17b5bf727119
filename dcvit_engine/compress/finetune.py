"""Few-shot finetuning shared by the compression methods.

- feature_mimic_finetune: DC-ViT / PRACTISE "MiR" finetuning.  The loss is the MSE
  between the student's and the teacher's forward_features (every token after the
  final norm); AdamW, cosine learning rate, and the DC-ViT loss warm-up
  weight min(step / warmup_steps, 1).  The head never trains (the loss does not
  reach it), and only the parameters that `trainable` selects get gradients.
- kd_finetune: UVC's distillation loss (1 - a) * CE(soft targets or labels)
  + a * tau^2 * KL, with a = 0.1, tau = 1; for UVC and CAIT's final finetuning.
- trainable_up_to: DC-ViT's "only the blocks up to the one after the latest
  compressed block" selection.

Students are trained in place.  Teachers are never changed (eval mode, no grad).
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError
from ..progress import progress_bar
from .augment import official_augment
from .fewshot import check_images, check_labels

Trainable = Callable[[str], bool] | Iterable[str] | Iterable[nn.Parameter] | None
_EMBEDDING_PREFIXES = ("patch_embed.", "cls_token", "dist_token", "reg_token", "pos_embed", "norm_pre.")
_HEAD_PREFIXES = ("head.", "head_dist.")


def trainable_up_to(model: nn.Module, last_block: int, final_norm: bool | None = None
                    ) -> Callable[[str], bool]:
    """Predicate on parameter names: the embeddings and blocks[0..last_block] train.

    final_norm: whether the final norm trains; None = only when last_block is the final
    block (or beyond). The official DC-ViT code always trains it (final_norm=True). The
    classifier head never trains.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} has no .blocks; expected a timm ViT or a ViTReference")
    if last_block < 0:
        raise InputError(f"last_block must be >= 0, got {last_block}")
    depth = len(blocks)
    last_block = min(last_block, depth - 1)
    with_final_norm = last_block == depth - 1 if final_norm is None else bool(final_norm)

    def is_trainable(name: str) -> bool:
        if name.startswith(_EMBEDDING_PREFIXES):
            return True
        if name.startswith("blocks."):
            return int(name.split(".")[1]) <= last_block
        return with_final_norm and name.startswith(("norm.", "fc_norm."))

    is_trainable.__qualname__ = f"trainable_up_to(block {last_block})"
    return is_trainable


def _head_names(model: nn.Module) -> set[str]:
    """Names of the classifier parameters (timm's get_classifier, else head./head_dist.)."""
    heads = model.get_classifier() if hasattr(model, "get_classifier") else ()
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)
    head_ids = {id(p) for h in heads if isinstance(h, nn.Module) for p in h.parameters()}
    return {name for name, p in model.named_parameters()
            if id(p) in head_ids or name.startswith(_HEAD_PREFIXES)}


def select_parameters(model: nn.Module, trainable: Trainable, train_head: bool) -> list[nn.Parameter]:
    """The parameters `trainable` picks: None = all, a predicate on names, names, or Parameters."""
    named = dict(model.named_parameters())
    head = set() if train_head else _head_names(model)
    if trainable is None:
        chosen = [n for n in named if n not in head]
    elif callable(trainable):
        chosen = [n for n in named if n not in head and trainable(n)]
    else:
        items = list(trainable)
        if all(isinstance(t, nn.Parameter) for t in items):
            by_id = {id(p): n for n, p in named.items()}
            missing = sum(id(p) not in by_id for p in items)
            if missing:
                raise InputError(f"{missing} of the {len(items)} trainable parameters are not parameters "
                                 "of the student; pass the student's own parameters")
            chosen = [by_id[id(p)] for p in items]
        elif all(isinstance(t, str) for t in items):
            unknown = [n for n in items if n not in named]
            if unknown:
                raise InputError(f"trainable names {unknown[:3]} are not parameters of the student "
                                 f"(it has e.g. {list(named)[:3]})")
            chosen = items
        else:
            raise TypeError("trainable must be None, a predicate on parameter names, parameter names, "
                            "or nn.Parameters")
        frozen_head = [n for n in chosen if n in head]
        if frozen_head:
            raise InputError(f"the classifier head stays frozen during feature mimicking; "
                             f"remove {frozen_head[:3]} from trainable")
    if not chosen:
        raise InputError("no parameter is trainable: `trainable` selected nothing")
    return [named[n] for n in dict.fromkeys(chosen)]


def light_augment(images: torch.Tensor, generator: torch.Generator, flip: bool = True) -> torch.Tensor:
    """Random horizontal flip (when `flip`; off-distribution for digits or text) and a random
    shift of up to 1/16 of the size (reflect padding)."""
    n, _, h, w = images.shape
    if flip:
        flipped = (torch.rand(n, generator=generator) < 0.5).to(images.device)
        images = torch.where(flipped.view(n, 1, 1, 1), images.flip(-1), images)
    pad = max(1, min(h, w) // 16)
    if pad >= min(h, w):  # reflect padding needs pad < size
        return images
    padded = F.pad(images, (pad,) * 4, mode="reflect")
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


def few_shot_batches(images: torch.Tensor, labels: torch.Tensor | None, batch_size: int, iters: int,
                     seed: int, augment: bool | str, device: torch.device, flip: bool = True
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """iters batches of min(batch_size, N) images drawn from back-to-back random permutations,
    so every image is seen equally often (with N = 50 and batch 64, each batch is all 50).
    augment: True = light_augment, "official" = fewshot.official_augment, False = none."""
    generator = torch.Generator().manual_seed(seed)
    size = min(batch_size, len(images))
    stream = torch.empty(0, dtype=torch.long)
    for _ in range(iters):
        while len(stream) < size:
            stream = torch.cat([stream, torch.randperm(len(images), generator=generator)])
        index, stream = stream[:size], stream[size:]
        x = images[index.to(images.device)].to(device, non_blocking=True)
        if augment == "official":
            x = official_augment(x, generator)
        elif augment:
            x = light_augment(x, generator, flip)
        y = None if labels is None else labels[index.to(labels.device)].to(device)
        yield x, y


def _teacher_on(teacher: nn.Module, device: torch.device) -> nn.Module:
    """The teacher on device; a copy when it lives elsewhere (the caller's teacher never moves)."""
    current = next(teacher.parameters()).device
    if current.type == device.type and device.index in (None, current.index):
        return teacher
    return copy.deepcopy(teacher).to(device)


def _check_not_shared(params: list[nn.Parameter], teacher: nn.Module) -> None:
    teacher_ids = {id(p) for p in teacher.parameters()}
    if any(id(p) in teacher_ids for p in params):
        raise InputError("the student shares trainable parameters with the teacher, so finetuning "
                         "would change the teacher too; give the student its own copy (copy.deepcopy)")


OPTIMIZERS = ("adamw", "sgd")


def _optimizer(name: str, params, lr: float, weight_decay: float, iters: int):
    """AdamW with a cosine schedule (DC-ViT), or SGD with momentum 0.9 and the learning rate
    divided by 10 every 40% of the iterations (PRACTISE in the DC-ViT code:
    StepLR(step_size=int(0.4 * iters), gamma=0.1), so at 40% and 80%)."""
    if name == "adamw":
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        factor = lambda step: 0.5 * (1.0 + math.cos(math.pi * step / iters))  # noqa: E731
    elif name == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
        step_size = max(1, int(0.4 * iters))
        factor = lambda step: 0.1 ** (step // step_size)  # noqa: E731
    else:
        raise InputError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _run(student: nn.Module, params: list[nn.Parameter], batches, iters: int, lr: float,
         weight_decay: float, loss_fn, warmup_steps: float, progress: bool, desc: str,
         optimizer: str = "adamw", max_grad_norm: float | None = None) -> list[float]:
    """_optimizer's optimizer and schedule over the batches; only params get gradients, their
    norm clipped to max_grad_norm when given.  The student's requires_grad flags and
    train/eval mode are restored afterwards."""
    flags = {p: p.requires_grad for p in student.parameters()}
    was_training = student.training
    chosen = {id(p) for p in params}
    for p in student.parameters():
        p.requires_grad_(id(p) in chosen)
    optimizer, schedule = _optimizer(optimizer, params, lr, weight_decay, iters)
    history: list[float] = []
    bar = progress_bar(total=iters, desc=desc, disable=not progress)
    try:
        student.train()
        for step, (x, y) in enumerate(batches, start=1):
            loss = loss_fn(x, y)
            weight = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
            optimizer.zero_grad(set_to_none=True)
            (loss * weight).backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            schedule.step()
            history.append(loss.item())
            bar.update()
            if step % 10 == 0 or step == iters:
                bar.set_postfix(loss=f"{history[-1]:.4g}")
    finally:
        bar.close()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        student.train(was_training)
    return history


def _check_settings(iters: int, batch_size: int, lr: float, weight_decay: float) -> None:
    if not isinstance(iters, int) or iters <= 0:
        raise InputError(f"iters must be a positive int, got {iters!r}")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    if lr <= 0 or weight_decay < 0:
        raise InputError(f"need lr > 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}")


def _setup(student: nn.Module, teacher: nn.Module, trainable: Trainable, device, train_head: bool):
    """(device, teacher there, the parameters to train): the student moves to `device`
    (default: where it is), the teacher is copied there if it lives elsewhere."""
    device = next(student.parameters()).device if device is None else torch.device(device)
    student.to(device)
    teacher = _teacher_on(teacher, device)
    params = select_parameters(student, trainable, train_head=train_head)
    _check_not_shared(params, teacher)
    return device, teacher, params


@contextlib.contextmanager
def _teacher_in_eval(teacher: nn.Module):
    """The teacher in eval mode for the run; its mode is restored afterwards."""
    was_training = teacher.training
    teacher.eval()
    try:
        yield
    finally:
        teacher.train(was_training)


def feature_mimic_finetune(student: nn.Module, teacher: nn.Module, images: torch.Tensor, iters: int,
                           batch_size: int = 64, lr: float = 3e-5, weight_decay: float = 1e-4,
                           trainable: Trainable = None, warmup_frac: float = 0.01, device=None,
                           seed: int = 0, progress: bool = True, augment: bool = True,
                           flip: bool = True, optimizer: str = "adamw",
                           max_grad_norm: float | None = None) -> list[float]:
    """Finetune student in place so its forward_features match the teacher's; returns the
    per-iteration (unweighted) MSE.  augment / flip: light_augment on every batch, with or
    without horizontal flips.  optimizer: "adamw" (cosine) or "sgd" (step decay), see _optimizer.
    max_grad_norm: clip the gradients' total norm to it (DC-ViT's code: 1.0); None: no clipping.

    trainable: None (everything but the head), a predicate on parameter names (see
    trainable_up_to), parameter names, or the student's nn.Parameters.  warmup_frac:
    the loss weight ramps up linearly over this fraction of the iterations (DC-ViT:
    min(ep / 20, 1) over 2000 iterations, i.e. 1%).  device: where to compute (default:
    the student's device; the student moves there, the teacher is copied if elsewhere).
    """
    _check_settings(iters, batch_size, lr, weight_decay)
    check_images(images)
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be positive (or None: no clipping), got {max_grad_norm!r}")
    if optimizer not in OPTIMIZERS:
        raise InputError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if not 0 <= warmup_frac < 1:
        raise InputError(f"warmup_frac must be in [0, 1), got {warmup_frac}")
    for model, what in ((student, "student"), (teacher, "teacher")):
        if not hasattr(model, "forward_features"):
            raise TypeError(f"the {what} ({type(model).__name__}) has no forward_features")
    device, teacher, params = _setup(student, teacher, trainable, device, train_head=False)

    def mse(x: torch.Tensor, _labels) -> torch.Tensor:
        with torch.no_grad():
            target = teacher.forward_features(x)
        features = student.forward_features(x)
        if features.shape != target.shape:
            raise InputError(
                f"feature mimicking needs the student's features to have the teacher's shape, got "
                f"{tuple(features.shape)} vs {tuple(target.shape)}: a student that merges tokens or "
                "changes the embedding width cannot be finetuned this way (use kd_finetune)")
        return F.mse_loss(features, target)

    batches = few_shot_batches(images, None, batch_size, iters, seed, augment, device, flip)
    with _teacher_in_eval(teacher):
        return _run(student, params, batches, iters, lr, weight_decay, mse, warmup_frac * iters,
                    progress, "feature mimicking", optimizer, max_grad_norm)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    # timm's distilled DeiT returns (cls, dist) logits while distilled training is on
    return sum(out) / len(out) if isinstance(out, (tuple, list)) else out


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            labels: torch.Tensor | None = None, alpha: float = 0.1, tau: float = 1.0) -> torch.Tensor:
    """UVC's distillation loss: (1 - alpha) * CE(targets) + alpha * tau^2 * KL(teacher || student / tau)
    / (batch * classes) -- the KL summed and divided by the logits' count, as the official
    code (DeiT's DistillationLoss, which UVC uses) does, not averaged over the batch only.

    The CE targets are the labels where given (>= 0) and the teacher's softmax for
    unlabeled images (labels None or -1).
    """
    teacher_logits = teacher_logits.detach()
    log_probs = F.log_softmax(student_logits, dim=-1)
    targets = F.softmax(teacher_logits, dim=-1)
    if labels is not None:
        known = labels >= 0
        one_hot = F.one_hot(labels.clamp(min=0), student_logits.shape[-1]).to(targets.dtype)
        targets = torch.where(known.unsqueeze(-1), one_hot, targets)
    cross_entropy = -(targets * log_probs).sum(-1).mean()
    kl = F.kl_div(F.log_softmax(student_logits / tau, dim=-1), F.log_softmax(teacher_logits / tau, dim=-1),
                  reduction="sum", log_target=True) / student_logits.numel()
    return (1.0 - alpha) * cross_entropy + alpha * tau * tau * kl


def kd_finetune(student: nn.Module, teacher: nn.Module, images: torch.Tensor,
                labels: torch.Tensor | None = None, iters: int = 100, batch_size: int = 64,
                lr: float = 3e-5, weight_decay: float = 1e-4, alpha: float = 0.1, tau: float = 1.0,
                trainable: Trainable = None, device=None, seed: int = 0, progress: bool = True,
                augment: bool = True) -> list[float]:
    """Finetune student in place with kd_loss against the teacher's logits; returns the
    per-iteration loss.  trainable: as in feature_mimic_finetune, but None trains every
    parameter including the head (UVC finetunes the whole pruned model)."""
    _check_settings(iters, batch_size, lr, weight_decay)
    check_images(images)
    check_labels(labels, images)
    if not 0 <= alpha <= 1 or tau <= 0:
        raise InputError(f"need 0 <= alpha <= 1 and tau > 0, got alpha={alpha}, tau={tau}")
    device, teacher, params = _setup(student, teacher, trainable, device, train_head=True)

    def distill(x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            target = _logits(teacher, x)
        return kd_loss(_logits(student, x), target, y, alpha, tau)

    batches = few_shot_batches(images, labels, batch_size, iters, seed, augment, device)
    with _teacher_in_eval(teacher):
        return _run(student, params, batches, iters, lr, weight_decay, distill, 0.0, progress,
                    "distillation")
