"""The phases a compression runs, counted in steps, before it starts: what `dcvit compress`,
`sweep` and `reproduce` print as their plan and what the overall progress line
(progress.RunProgress) counts the phases' bars against.

A method's phases follow from its settings (its defaults with the given options over them)
and, where it has one, its plan (how many candidate blocks are scored and how many are
compressed). A method without an entry in PHASES gets one phase per `*iters` setting.
"""
from __future__ import annotations

from ..progress import DEEPINVERSION, TRAINING
from .api import method_defaults, method_plan, plan_options


def _dcvit(settings: dict, plan) -> list[tuple]:
    select_iters = settings["select_iters"] or settings["iters"]
    return [("metric set", 0 if settings.get("metric_set") is not None else settings["metric_iters"],
             DEEPINVERSION),
            (f"scoring {len(plan.candidates)} candidates x {select_iters}",
             len(plan.candidates) * select_iters, TRAINING),
            (f"progressive {plan.blocks_compressed} x {settings['iters']}",
             plan.blocks_compressed * settings["iters"], TRAINING)]


def _practise(settings: dict, plan) -> list[tuple]:
    adaptor_iters = settings["adaptor_iters"] or settings["iters"]
    return [(f"scoring {len(plan.candidates)} candidates x {adaptor_iters}",
             len(plan.candidates) * adaptor_iters, TRAINING),
            ("finetuning", settings["iters"], TRAINING)]


def _search_then_distil(settings: dict, plan) -> list[tuple]:
    return [("search", settings["iters"], TRAINING), ("distillation", settings["finetune_iters"], TRAINING)]


PHASES = {"dcvit": _dcvit, "practise": _practise, "uvc": _search_then_distil, "cait": _search_then_distil}


def planned_phases(method: str, spec, target_macs: float | None, options: dict) -> list[tuple[str, int, str]]:
    """[(label, steps, step kind)] of `method` compressing a model of `spec` to `target_macs`
    with `options` (those given; the method's defaults fill the rest)."""
    settings = {**method_defaults(method), **options}
    plan_function = method_plan(method)
    plan = None
    if plan_function is not None and target_macs is not None:
        accepted = plan_options(method)
        plan = plan_function(spec, target_macs, **{k: v for k, v in options.items() if k in accepted})
    if method in PHASES:
        return PHASES[method](settings, plan)
    return [(name, value, TRAINING) for name, value in settings.items()
            if name.endswith("iters") and isinstance(value, int) and not isinstance(value, bool)]


def sweep_phases(spec, methods_options: dict, targets, seeds: int, metric_iters: int | None,
                 budget: str) -> list[tuple[str, int, str]]:
    """The phases of `dcvit sweep`: one metric set per draw (when a method uses one), then
    every method at every target per draw, with the sweep's budget applied (sweep.py); the
    DC-ViT rows at PRACTISE's MACs points (--pair) are not counted."""
    from ..sweep import _budget_options

    phases = []
    for seed in range(seeds):
        if metric_iters is not None:
            phases.append((f"metric set draw {seed}", metric_iters, DEEPINVERSION))
        for method, options in methods_options.items():
            for target in targets:
                run = dict(_budget_options(method, options, spec, target, budget), metric_set=True)
                steps = sum(s for _, s, kind in planned_phases(method, spec, target, run) if kind == TRAINING)
                phases.append((f"{method} {target}", steps, TRAINING))
    return phases
