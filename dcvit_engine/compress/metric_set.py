"""DC-ViT's synthetic metric set: DeepInversion images from Gaussian noise.

DC-ViT scores candidate blocks on images synthesized from the teacher alone (its
gen_metric/, NVIDIA's DeepInversion with the ViT settings): one random target
class per image, and the images are optimized to minimize

    CE(T(x), y) + tv_weight * sum_k ||D_k x||_2 ** beta + l2_weight * mean_i ||x_i||_2

where D_k are the four neighbouring-pixel differences (right, down, and both
diagonals), beta = 0.6, tv_weight = 1e-4, l2_weight = 1e-5 (no feature-statistics
term for ViTs).  Every iteration the batch is rolled by a random jitter (+-30 px at
224, scaled with the image size) and flipped with probability 1/2; Adam lr 0.25,
betas (0.5, 0.9), linear warm-up then cosine; pixels are clipped to the valid range
when the normalization is known; the images of the lowest-loss iteration are kept.

With a cache path, the optimization itself is checkpointed (images, Adam's state, the
random generator, the best images so far) beside the cache file at most every
`checkpoint_seconds`, so an interrupted synthesis resumes from its last checkpoint and
ends with the images an uninterrupted one would have made.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..atomic import atomic_path
from ..errors import InputError
from ..progress import progress_bar
from .run_state import tensor_digest

_REFERENCE_SIZE = 224   # DeepInversion's resolution, for which jitter = 30 px
_REFERENCE_JITTER = 30
_REFERENCE_WARMUP = 100  # of 2000 iterations
_FORMAT_VERSION = 1
CHECKPOINT_SECONDS = 60.0  # an interruption loses at most about this much synthesis


class MetricSet(NamedTuple):
    images: torch.Tensor          # (N, C, H, W) float32 on the CPU, normalized like the teacher's input
    target_classes: torch.Tensor  # (N,) long: the class each image was optimized towards
    loss_history: list[float]     # total loss per iteration


def _teacher_input(teacher: nn.Module, img_size) -> tuple[tuple[int, int], int]:
    """(H, W) and channels of the teacher's input: from img_size, else a ViTReference's
    spec, a timm ViT's patch_embed, or its pretrained_cfg."""
    spec = getattr(teacher, "spec", None)
    patch_embed = getattr(teacher, "patch_embed", None)
    proj = getattr(patch_embed, "proj", None)
    if spec is not None:
        in_chans, size = spec.in_chans, spec.img_size
    else:
        in_chans = proj.in_channels if isinstance(proj, nn.Conv2d) else 3
        size = getattr(patch_embed, "img_size", None)
        if size is None and "input_size" in (getattr(teacher, "pretrained_cfg", None) or {}):
            size = teacher.pretrained_cfg["input_size"][1:]
    if img_size is not None:
        size = img_size
    if size is None:
        raise InputError("could not tell the teacher's input size; pass img_size")
    size = (size, size) if isinstance(size, int) else tuple(size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise InputError(f"img_size must be a positive int or an (H, W) pair of ints, got {img_size!r}")
    return size, in_chans


def _pixel_bounds(teacher: nn.Module, mean, std, in_chans: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-channel bounds of a valid normalized image ((0 - mean) / std, (1 - mean) / std),
    or None when the normalization is unknown (then nothing is clipped)."""
    cfg = getattr(teacher, "pretrained_cfg", None) or {}
    mean = cfg.get("mean") if mean is None else mean
    std = cfg.get("std") if std is None else std
    if mean is None or std is None:
        return None
    mean = torch.as_tensor(mean, dtype=torch.float32).flatten().expand(in_chans).reshape(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).flatten().expand(in_chans).reshape(1, -1, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


def image_prior_tv(x: torch.Tensor, beta: float) -> torch.Tensor:
    """sum over the four neighbour differences of ||difference||_2 ** beta (DeepInversion's loss_var_l2)."""
    diffs = (x[:, :, :, :-1] - x[:, :, :, 1:], x[:, :, :-1, :] - x[:, :, 1:, :],
             x[:, :, 1:, :-1] - x[:, :, :-1, 1:], x[:, :, :-1, :-1] - x[:, :, 1:, 1:])
    return sum(torch.linalg.vector_norm(d) ** beta for d in diffs)


def _target_classes(num_images: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """One random class per image: distinct classes while they last (as DC-ViT's 50 of 1000),
    then as evenly as possible; sorted."""
    rounds = math.ceil(num_images / num_classes)
    classes = torch.cat([torch.randperm(num_classes, generator=generator) for _ in range(rounds)])
    return classes[:num_images].sort().values


def _cache_file(cache_path, key: str) -> Path | None:
    """A folder gets one keyed file per setting; a file path is used as given (its key is checked)."""
    if cache_path is None:
        return None
    path = Path(cache_path).expanduser()
    return path / f"metric_set-{key[:16]}.pt" if path.is_dir() else path


def _load_cached(path: Path | None, key: str) -> MetricSet | None:
    if path is None or not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # an unreadable cache is regenerated, not fatal
        return None
    if not isinstance(saved, dict) or saved.get("key") != key:
        return None
    return MetricSet(saved["images"], saved["target_classes"], [float(v) for v in saved["loss_history"]])


def _save_atomically(path: Path, data: dict) -> None:
    buffer = io.BytesIO()  # torch's file writer can abort the process on a full disk: write with Python
    torch.save(data, buffer)
    with atomic_path(path) as temp:
        temp.write_bytes(buffer.getbuffer())


def _save_cached(path: Path, key: str, result: MetricSet) -> None:
    _save_atomically(path, {"key": key, "images": result.images, "target_classes": result.target_classes,
                            "loss_history": torch.tensor(result.loss_history, dtype=torch.float64)})


def progress_file(path: Path) -> Path:
    """Where the unfinished optimization of the cache file `path` is checkpointed."""
    return path.with_name(path.name + ".progress")


def _load_progress(path: Path | None, key: str) -> dict | None:
    """The checkpointed optimization for `key`, or None (none, another setting, unreadable)."""
    if path is None or not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # an unreadable checkpoint only costs the iterations it held
        return None
    return saved if isinstance(saved, dict) and saved.get("key") == key else None


def synthesize_metric_set(teacher: nn.Module, num_images: int = 50, iters: int = 2000, lr: float = 0.25,
                          img_size: int | Sequence[int] | None = None, seed: int = 0,
                          cache_path: str | os.PathLike | None = None, progress: bool = True, *,
                          tv_weight: float = 1e-4, tv_beta: float = 0.6, l2_weight: float = 1e-5,
                          jitter: int | None = None, flip: bool = True, warmup_iters: int | None = None,
                          mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                          device=None, checkpoint_seconds: float | None = None) -> MetricSet:
    """num_images DeepInversion images of the teacher (see the module docstring).

    img_size: (H, W) or int (default: the teacher's input size).  jitter: maximum
    shift in pixels (default 30 * size / 224).  warmup_iters: default 100 * iters / 2000.
    mean/std: the input normalization, for clipping to valid pixels (default: the
    teacher's timm pretrained_cfg; no clipping when unknown).  cache_path: a .pt file,
    or a folder for one file per setting; a cached set made from the same teacher
    weights and settings is returned instead of synthesizing again, and an interrupted
    synthesis continues from its checkpoint (written at most every checkpoint_seconds,
    default CHECKPOINT_SECONDS, 0: every iteration; the images do not depend on where it
    was interrupted).
    """
    for name, value in (("num_images", num_images), ("iters", iters)):
        if not isinstance(value, int) or value <= 0:
            raise InputError(f"{name} must be a positive int, got {value!r}")
    if lr <= 0 or tv_weight < 0 or l2_weight < 0 or tv_beta <= 0:
        raise InputError("need lr > 0, tv_beta > 0 and non-negative tv_weight / l2_weight")
    (height, width), in_chans = _teacher_input(teacher, img_size)
    jitter = round(_REFERENCE_JITTER * min(height, width) / _REFERENCE_SIZE) if jitter is None else jitter
    warmup_iters = max(1, round(_REFERENCE_WARMUP * iters / 2000)) if warmup_iters is None else warmup_iters
    if jitter < 0 or not 0 <= warmup_iters < iters + 1:
        raise InputError(f"need jitter >= 0 and 0 <= warmup_iters <= iters, got {jitter}, {warmup_iters}")
    bounds = _pixel_bounds(teacher, mean, std, in_chans)

    settings = dict(version=_FORMAT_VERSION, num_images=num_images, iters=iters, lr=lr, size=[height, width],
                    in_chans=in_chans, seed=seed, tv_weight=tv_weight, tv_beta=tv_beta, l2_weight=l2_weight,
                    jitter=jitter, flip=flip, warmup_iters=warmup_iters,
                    bounds=None if bounds is None else [b.flatten().tolist() for b in bounds])
    # the same content hash a run checkpoint keys its teacher by (run_state.tensor_digest)
    teacher_state = tensor_digest(*teacher.state_dict().values())
    key = hashlib.sha256((teacher_state + json.dumps(settings, sort_keys=True)).encode()).hexdigest()
    path = _cache_file(cache_path, key)
    cached = _load_cached(path, key)
    if cached is not None:
        return cached

    device = next(teacher.parameters()).device if device is None else torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    flags = {p: p.requires_grad for p in teacher.parameters()}
    was_training = teacher.training
    teacher.eval()
    for p in teacher.parameters():  # gradients flow to the images only
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            num_classes = teacher(torch.zeros(1, in_chans, height, width, device=device)).shape[-1]
        targets = _target_classes(num_images, num_classes, generator)
        images = torch.randn(num_images, in_chans, height, width, generator=generator).to(device)
        images.requires_grad_(True)
        if bounds is not None:
            bounds = tuple(b.to(device) for b in bounds)
        optimizer = torch.optim.Adam([images], lr=lr, betas=(0.5, 0.9), eps=1e-8)
        targets_on_device = targets.to(device)
        best_loss, best_images, history = math.inf, images.detach().clone(), []
        progress_path = None if path is None else progress_file(path)
        first = 0
        saved = _load_progress(progress_path, key)
        if saved is not None:
            with torch.no_grad():
                images.copy_(saved["images"].to(device))
            optimizer.load_state_dict(saved["optimizer"])
            generator.set_state(saved["generator"])
            first, best_loss = int(saved["step"]), float(saved["best_loss"])
            best_images, history = saved["best_images"].to(device), [float(v) for v in saved["history"]]
        last_save = time.monotonic()
        checkpoint_seconds = CHECKPOINT_SECONDS if checkpoint_seconds is None else checkpoint_seconds
        steps = progress_bar(range(first, iters), total=iters - first, disable=not progress,
                             desc="metric set (DeepInversion)" + (f", resumed at {first}" if first else ""))
        for step in steps:
            due = step > first and time.monotonic() - last_save >= checkpoint_seconds
            if progress_path is not None and due:
                _save_atomically(progress_path, dict(
                    key=key, step=step, images=images.detach().cpu(), optimizer=optimizer.state_dict(),
                    generator=generator.get_state(), best_loss=best_loss, best_images=best_images.cpu(),
                    history=torch.tensor(history, dtype=torch.float64)))
                last_save = time.monotonic()
            if step < warmup_iters:
                step_lr = lr * (step + 1) / warmup_iters
            else:
                cosine = math.cos(math.pi * (step - warmup_iters) / max(1, iters - warmup_iters))
                step_lr = 0.5 * (1 + cosine) * lr
            for group in optimizer.param_groups:
                group["lr"] = step_lr
            dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=generator).tolist()
            jittered = torch.roll(images, shifts=(dy, dx), dims=(2, 3))
            if flip and torch.rand(1, generator=generator).item() > 0.5:
                jittered = jittered.flip(3)
            loss = (F.cross_entropy(teacher(jittered), targets_on_device)
                    + tv_weight * image_prior_tv(jittered, tv_beta)
                    + l2_weight * jittered.flatten(1).norm(dim=1).mean())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            value = loss.item()
            history.append(value)
            if value < best_loss:  # keep the images this loss was measured on, before the step
                best_loss, best_images = value, images.detach().clone()
            optimizer.step()
            if bounds is not None:
                with torch.no_grad():
                    images.clamp_(min=bounds[0], max=bounds[1])
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        teacher.train(was_training)
    result = MetricSet(best_images.cpu().float(), targets, history)
    if path is not None:
        _save_cached(path, key, result)
        progress_path.unlink(missing_ok=True)  # done: the cache file holds the result
    return result
