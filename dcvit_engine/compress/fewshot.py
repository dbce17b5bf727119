"""What every method does with its few-shot inputs: checks of the model, the images, the
labels and the counts a method is given; the teacher on a device and its predictions on the
images, a student's KL divergence from them, mean MLP activations; progress lines. (The
device choice is dcvit_engine/devices.py's; the few-shot augmentations, once here, are
compress/augment.py's and stay importable from here for one release.)"""
from __future__ import annotations

import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import check_finite
from ..errors import InputError, is_int
from ..reference import ViTReference, activation, reference_from_timm
from .augment import AUGMENTATIONS, augment_flags, official_augment  # noqa: F401  (old import path)


def as_reference(model, head_required: bool = True) -> ViTReference:
    """The teacher as a ViTReference (a timm ViT is converted; with head_required it must have
    a classifier, since block scores and distillation compare class distributions)."""
    if isinstance(model, ViTReference):
        reference = model
    elif isinstance(model, nn.Module):
        reference = reference_from_timm(model)
    else:
        raise TypeError(f"expected a timm VisionTransformer or a ViTReference, got {type(model).__name__}")
    if head_required and reference.spec.num_classes == 0:
        raise InputError("the model has no classification head (num_classes = 0); block selection "
                         "compares class distributions, so give a model with its head")
    return reference


def check_images(images, spec=None, what: str = "images") -> torch.Tensor:
    """A float (N, C, H, W) tensor (at the model's input size when `spec` is given) without
    NaN/Inf, or a ValueError saying what is off."""
    expected = None if spec is None else (spec.in_chans, *spec.img_size)
    if (not isinstance(images, torch.Tensor) or images.dim() != 4
            or (expected is not None and tuple(images.shape[1:]) != expected)):
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        shape = "(N, C, H, W)" if expected is None else \
            f"of shape (N, {expected[0]}, {expected[1]}, {expected[2]}) (the model's input size)"
        raise InputError(f"{what} must be a float tensor {shape}, got {got}")
    if images.shape[0] == 0:
        raise InputError(f"{what} is empty: give at least one image")
    if not images.is_floating_point():
        raise InputError(f"{what} must be float (normalised as the model expects), got {images.dtype}")
    check_finite(images)
    return images


def on_device(model: ViTReference, device: torch.device) -> ViTReference:
    """The model on `device`: itself if it is there already, else a copy (the caller's
    module is never moved)."""
    current = next(model.parameters()).device
    if current.type == device.type and device.index in (None, current.index):
        return model
    moved = ViTReference.from_state(model.spec, {k: v.detach().to(device, copy=True)
                                                 for k, v in model.state_dict().items()})
    return moved.train(model.training)


def check_positive(**values) -> None:
    """Each keyword must be a positive integer (iteration counts, batch sizes, set sizes)."""
    for name, value in values.items():
        if not is_int(value) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")


def check_non_negative(**values) -> None:
    """Each keyword must be a non-negative integer (e.g. finetuning iterations that may be 0)."""
    for name, value in values.items():
        if not is_int(value) or value < 0:
            raise InputError(f"{name} must be a non-negative integer, got {value!r}")


def check_labels(labels, images: torch.Tensor) -> None:
    """Optional labels: None, or a tensor of one class index per image (-1: unlabeled)."""
    if labels is not None and (not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (len(images),)):
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise InputError(f"labels must have shape ({len(images)},), one class index per image; got {got}")


def _batches(images: torch.Tensor, batch_size: int):
    for start in range(0, images.shape[0], batch_size):
        yield images[start:start + batch_size]


@torch.no_grad()
def predict_logits(model: ViTReference, images: torch.Tensor, batch_size: int,
                   device: torch.device) -> torch.Tensor:
    """The model's outputs for `images`, as float32 on the CPU (eval mode)."""
    was_training = model.training
    model.eval()
    outs = [model(batch.to(device)).float().cpu() for batch in _batches(images, batch_size)]
    model.train(was_training)
    return torch.cat(outs)


@torch.no_grad()
def kl_to_teacher(student: ViTReference, images: torch.Tensor, teacher_logits: torch.Tensor,
                  batch_size: int, device: torch.device) -> float:
    """Mean over images of KL(softmax(teacher) || softmax(student)): lower = closer."""
    student_logits = predict_logits(student, images, batch_size, device)
    kl = F.kl_div(F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits, dim=-1),
                  reduction="batchmean", log_target=True)
    return float(kl)


@torch.no_grad()
def mean_mlp_activations(model: ViTReference, images: torch.Tensor, blocks, batch_size: int,
                         device: torch.device) -> dict[int, torch.Tensor]:
    """Per block: the mean post-GELU activation of every MLP hidden neuron over all images
    and tokens (DC-ViT's 'GELU_sample' ranks neurons by it)."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def hook_for(index):
        mlp = model.blocks[index].mlp

        def hook(_module, _inputs, output):
            # fc1's output through the block's activation (gated: act(gate) * value): the hidden
            # neurons as fc2 (or the inner norm) receives them
            if mlp.gated:
                gate, value = output.chunk(2, dim=-1)
                hidden = activation(mlp.act, gate) * value
            else:
                hidden = activation(mlp.act, output)
            total = hidden.double().sum(dim=(0, 1)).cpu()
            sums[index] = total if index not in sums else sums[index] + total
            counts[index] = counts.get(index, 0) + hidden.shape[0] * hidden.shape[1]
        return hook

    handles = [model.blocks[i].mlp.fc1.register_forward_hook(hook_for(i)) for i in blocks]
    was_training = model.training
    model.eval()
    try:
        for batch in _batches(images, batch_size):
            model.forward_features(batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {i: (sums[i] / counts[i]).float() for i in blocks}


def loss_change(what: str, losses: list[float]) -> str:
    """'feature MSE a -> b over N steps', or what a single step measured: one step has no
    before and after, and printing 'a -> a' would read as a run that trained and gained nothing."""
    if len(losses) == 1:
        return f"{what} {losses[0]:.5f} at its only finetuning step (one step: no change to report)"
    return f"{what} {losses[0]:.5f} -> {losses[-1]:.5f} over {len(losses)} steps"


class ProgressLog:
    """One line per event on stderr, with the seconds since the run started (when enabled)."""

    def __init__(self, enabled: bool, prefix: str):
        self.enabled = enabled
        self.prefix = prefix
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[{self.prefix} {time.perf_counter() - self.start:7.1f}s] {message}",
                  file=sys.stderr, flush=True)
