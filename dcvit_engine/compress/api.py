"""One entry point for every compression method:

    student = dcvit_engine.compress(model, images, method="dcvit", target_macs=0.7, **options)

`model` is a timm VisionTransformer, a ViTReference or an artifact folder; `images` the
few-shot images as an (N, C, H, W) tensor at the model's input size (labels not needed);
`target_macs` the fraction of the teacher's MACs to keep. The options are the method
function's keyword arguments (see `method_options`); `progress` and `report` are passed
to methods that take them. The result is a new ViTReference in eval mode.
"""
from __future__ import annotations

import importlib
import inspect
import os

import torch

from ..data import check_finite, nonfinite_rows, refuse_nonfinite
from ..reference import ViTReference

# method name -> (module under dcvit_engine.compress, function). Each function takes
# (model, images, target_macs, **options) and returns the compressed ViTReference.
METHODS = {
    "dcvit": ("dcvit", "compress_dcvit"),
    "practise": ("practise", "compress_practise"),
    "uvc": ("uvc", "compress_uvc"),
    "cait": ("cait", "compress_cait"),
    "tome": ("tome", "compress_tome"),
}


def method_function(method: str):
    """The function implementing `method` (imported on first use)."""
    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r}; choose one of {', '.join(METHODS)}")
    module, name = METHODS[method]
    return getattr(importlib.import_module(f"dcvit_engine.compress.{module}"), name)


def method_options(method: str) -> list[str]:
    """The keyword options `method` accepts besides model, images and target_macs."""
    params = inspect.signature(method_function(method)).parameters
    return [name for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def method_defaults(method: str) -> dict:
    """The default of every keyword option of `method`, read off its signature (the one
    place a method's defaults live; the CLI only passes what the user gave)."""
    params = inspect.signature(method_function(method)).parameters
    return {name: p.default for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _load_if_path(model):
    if isinstance(model, (str, os.PathLike)):
        from ..artifact import load
        return load(model)
    return model


def _input_shape(model) -> tuple | None:
    """(C, H, W) a ViTReference or a timm ViT takes, else None."""
    if isinstance(model, ViTReference):
        return (model.spec.in_chans, *model.spec.img_size)
    embed = getattr(model, "patch_embed", None) if isinstance(model, torch.nn.Module) else None
    proj, size = getattr(embed, "proj", None), getattr(embed, "img_size", None)
    if proj is None or size is None or getattr(embed, "dynamic_img_size", False):
        return None
    return (proj.in_channels, *size)


@torch.no_grad()
def _check_teacher_outputs(model, images, batch_size: int = 64) -> None:
    """Images with NaN/Inf, or a teacher whose outputs are NaN/Inf on them, are refused before
    any work (one forward pass where the model lives; the caller's model is not moved)."""
    check_finite(images)
    if _input_shape(model) != tuple(images.shape[1:]):
        return  # the method names what is wrong with the model or the images' shape
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        bad = sum(nonfinite_rows(model(images[i:i + batch_size].to(device)))
                  for i in range(0, images.shape[0], batch_size))
    finally:
        model.train(was_training)
    refuse_nonfinite(images.shape[0], bad_outputs=bad, model="the teacher")


def compress(model, images=None, method: str = "dcvit", target_macs: float | None = None, *,
             progress: bool = False, report: dict | None = None, **options) -> ViTReference:
    """Compress `model` with `method` to `target_macs` (see the module docstring).

    report: a dict that receives what the method decided (plan, chosen blocks, scores,
    losses, timings, achieved MACs). Unknown options raise ValueError listing the valid ones.
    """
    function = method_function(method)
    accepted = method_options(method)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"method {method!r} has no option(s) {', '.join(unknown)}; its options are "
                         f"{', '.join(o for o in accepted if o not in ('progress', 'report'))}")
    if target_macs is None and method != "tome":
        raise ValueError(f"method {method!r} needs target_macs, the fraction of the teacher's MACs "
                         "to keep (e.g. 0.75)")
    if "progress" in accepted:
        options["progress"] = progress
    if "report" in accepted:
        options["report"] = report
    model = _load_if_path(model)
    if isinstance(images, torch.Tensor) and images.dim() == 4 and images.is_floating_point():
        _check_teacher_outputs(model, images)  # shape and dtype errors are the method's to name
    student = function(model, images, target_macs, **options)
    if report is not None and "report" not in accepted:
        report.setdefault("method", method)
    return student
