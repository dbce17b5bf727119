"""One entry point for every compression method, and the one place methods are registered:

    student = dcvit_engine.compress(model, images, method="dcvit", target_macs=0.7, **options)

`model` is a timm VisionTransformer, a ViTReference or an artifact folder; `images` the
few-shot images as an (N, C, H, W) tensor at the model's input size (labels not needed);
`target_macs` the fraction of the teacher's MACs to keep. The options are the method
function's keyword arguments (see `method_options`); `progress` and `report` are passed
to methods that take them. The result is a new ViTReference in eval mode; `report`
receives the common report (compress/run.py).

A method `name` is one module, dcvit_engine.compress.<name>, with one entry point
`compress_<name>(model, images, target_macs, *, ..., report=None)` built on run.MethodRun,
and CLI_OPTIONS (the options `dcvit compress` offers); its line in METHODS below is all
that `dcvit compress`, `dcvit sweep`, `dcvit plan` and this function know of it: what it
needs (images, a MACs target) and which function plans it.
"""
from __future__ import annotations

import importlib
import inspect
import os
from dataclasses import dataclass, field

from ..errors import InputError
from ..reference import ViTReference


@dataclass(frozen=True)
class Method:
    """A registered method `name`: module dcvit_engine.compress.<name>, entry point
    compress_<name>. summary: one line for help texts; plan: the name of a function in the
    module that plans the structure from the target alone (`dcvit plan`, which offers its
    keyword options; None when the structure depends on data); uses_images: False for a
    training-free method that never looks at images (`dcvit compress` then needs no --data);
    needs_target: False when target_macs may be None (ToMe: r instead). quick: the cheapest
    options that run the method end to end (the registry's tests run every method so)."""
    summary: str
    plan: str | None = None
    uses_images: bool = True
    needs_target: bool = True
    quick: dict = field(default_factory=dict, hash=False)


METHODS = {
    "dcvit": Method("drop attention, shrink MLPs (default)", plan="plan_dcvit",
                    quick=dict(iters=1, select_iters=1, metric_size=2, metric_iters=1, batch_size=4)),
    "practise": Method("drop whole blocks", plan="plan_block_drop",
                       quick=dict(iters=1, adaptor_iters=1, batch_size=4)),
    "uvc": Method("prune heads, head channels, MLP neurons and skip blocks",
                  quick=dict(iters=2, finetune_iters=1, batch_size=4)),
    "cait": Method("grid-keeping token merging plus channel pruning shared by all heads",
                   quick=dict(iters=2, finetune_iters=1, batch_size=4)),
    "tome": Method("training-free token merging", uses_images=False, needs_target=False),
}
# options every method's run scaffold handles (not method settings): the CLI sets them itself
RUN_OPTIONS = ("device", "seed", "labels", "checkpoint_dir", "resume", "progress", "report")


def _method(method: str) -> Method:
    if method not in METHODS:
        raise InputError(f"unknown compression method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method]


def method_module(method: str):
    """The module implementing `method` (imported on first use)."""
    _method(method)
    return importlib.import_module(f"dcvit_engine.compress.{method}")


def method_function(method: str):
    """The entry point of `method`, compress_<method>."""
    return getattr(method_module(method), f"compress_{method}")


def method_plan(method: str):
    """The function planning `method`'s structure from the target alone (its first argument
    the teacher's spec), or None."""
    name = _method(method).plan
    return None if name is None else getattr(method_module(method), name)


def method_options(method: str) -> list[str]:
    """The keyword options `method` accepts besides model, images and target_macs."""
    return list(method_defaults(method))


def method_defaults(method: str) -> dict:
    """The default of every keyword option of `method`, read off its signature (the one
    place a method's defaults live; the CLI only passes what the user gave)."""
    params = inspect.signature(method_function(method)).parameters
    return {name: p.default for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def method_cli_options(method: str) -> dict:
    """name -> run.CliOption: the options `dcvit compress` offers for `method`."""
    return dict(getattr(method_module(method), "CLI_OPTIONS", {}))


def target_required(method: str) -> bool:
    """False for a method whose target_macs may be None (ToMe: r instead)."""
    return _method(method).needs_target


def plan_options(method: str) -> list[str]:
    """The keyword options of `method`'s plan function ([] without one): what `dcvit plan`
    offers and accepts for it."""
    plan = method_plan(method)
    if plan is None:
        return []
    params = inspect.signature(plan).parameters
    return [n for n, p in params.items() if p.default is not inspect.Parameter.empty]


def plan_defaults(method: str) -> dict:
    """The default of every keyword option of `method`'s plan function."""
    params = inspect.signature(method_plan(method)).parameters
    return {n: params[n].default for n in plan_options(method)}


def _load_if_path(model):
    if isinstance(model, (str, os.PathLike)):
        from ..artifact import load
        return load(model)
    return model


def compress(model, images=None, method: str = "dcvit", target_macs: float | None = None, *,
             progress: bool = False, report: dict | None = None, **options) -> ViTReference:
    """Compress `model` with `method` to `target_macs` (see the module docstring).

    report: a dict that receives the common report (run.py: target, achieved MACs and
    ratio, structure, timings, the method's extras). Unknown options raise ValueError
    listing the valid ones.
    """
    function = method_function(method)
    accepted = method_options(method)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise InputError(f"method {method!r} has no option(s) {', '.join(unknown)}; its options are "
                         f"{', '.join(o for o in accepted if o not in ('progress', 'report'))}")
    if target_macs is None and target_required(method):
        raise InputError(f"method {method!r} needs target_macs, the fraction of the teacher's MACs "
                         "to keep (e.g. 0.75)")
    if "progress" in accepted:
        options["progress"] = progress
    options["report"] = report
    model = _load_if_path(model)
    return function(model, images, target_macs, **options)
