"""Defaults that depend on the budget, and the named presets of `dcvit compress`.

The learning-rate rule. The DC-ViT paper finetunes DeiT-B for 2000 iterations at AdamW lr
3e-5. At 100-150 iterations that rate under-trains: on the demo's model 3e-5 scored 2-10
points below 1e-3, the best rate measured there (README, "The demo, measured"). So where a
method's learning rate is left at its default, it follows the finetuning budget: 1e-3 at
150 iterations or fewer, the paper's 3e-5 at 2000 or more, and in between the straight line
between those two measured points on log-log axes (e.g. 500 iterations -> 2.0e-4).

The quick preset sizes the few-shot methods for a laptop CPU (minutes, not hours) by
setting the iteration counts, the metric set and the batch size; options given on the
command line win over it.
"""
from __future__ import annotations

import math

PAPER_LR, PAPER_ITERS = 3e-5, 2000  # DC-ViT's recipe (DeiT-B)
SMALL_BUDGET_LR, SMALL_BUDGET_ITERS = 1e-3, 150  # the best rate of the demo's lr table

LR_RULE = (f"default: follows the iterations, {SMALL_BUDGET_LR:g} at <= {SMALL_BUDGET_ITERS}, the paper's "
           f"{PAPER_LR:g} at >= {PAPER_ITERS}, log-log interpolated between (3e-5 under-trains small "
           "budgets: README, The demo, measured)")


def budget_lr(iters: int) -> float:
    """The default learning rate for `iters` finetuning iterations (the rule above)."""
    if iters <= SMALL_BUDGET_ITERS:
        return SMALL_BUDGET_LR
    if iters >= PAPER_ITERS:
        return PAPER_LR
    share = math.log(iters / SMALL_BUDGET_ITERS) / math.log(PAPER_ITERS / SMALL_BUDGET_ITERS)
    return math.exp(math.log(SMALL_BUDGET_LR) + share * math.log(PAPER_LR / SMALL_BUDGET_LR))


# What `--preset quick` sets, per option name (a method gets only the options it takes).
# DC-ViT's cost is metric set + candidates x select_iters + steps x iters; these keep each
# term to a few hundred small steps.
PRESETS = {
    "quick": dict(iters=100, select_iters=25, adaptor_iters=25, finetune_iters=100, metric_size=8,
                  metric_iters=100, batch_size=16),
}


def describe_preset(name: str) -> str:
    return ", ".join(f"{option} {value}" for option, value in PRESETS[name].items())


def preset_options(name: str | None, accepted, given: dict) -> dict:
    """The preset's values for the options in `accepted` that the user did not give."""
    if name is None:
        return {}
    return {option: value for option, value in PRESETS[name].items()
            if option in accepted and given.get(option) is None}


# More steps than this on a CPU means hours for a real model (a DeiT-S training step takes
# seconds on a laptop CPU): the settings were sized for a GPU.
CPU_STEPS_LIMIT = 2000


QUICK_FIX = (f"add --preset quick ({describe_preset('quick')}) or lower --iters, --select-iters / "
             "--adaptor-iters and --metric-iters")


def gpu_sized_note(device: str, steps: int, preset: str | None, fix: str = QUICK_FIX) -> str | None:
    """A line saying that `steps` steps on a CPU are sized for a GPU, naming what fits (`fix`);
    None when the run is on a GPU, small enough, or already the quick preset."""
    if not device.startswith("cpu") or steps <= CPU_STEPS_LIMIT or preset == "quick":
        return None
    return f"these settings ({steps} steps) are sized for a GPU (the papers' defaults); on this CPU " \
           f"that can take hours: {fix}"
