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
    student = function(_load_if_path(model), images, target_macs, **options)
    if report is not None and "report" not in accepted:
        report.setdefault("method", method)
    return student
