"""Compress one teacher to a family of MACs targets with several methods and compare them.

Each row: the method, its target, the seed (few-shot draw), the MACs and parameters it
reached, top-1 on labeled evaluation images, top-1 agreement with the teacher, the latency
measured on the engine (the fused ops, on the device given), the finetuning iterations the
method spent, and the blocks it chose with every candidate's score. The same rows feed the
`dcvit sweep` and `dcvit demo` tables (mean +- std over seeds), CSV (one line per seed)
and plot (error bars).

Fairness rules (the defaults): every DC-ViT / PRACTISE student gets the same total
finetuning iterations (DC-ViT splits them over its progressive steps; block selection
scores each candidate after that same total, full-length as the official code), and
DC-ViT is also run at each PRACTISE MACs point with one block more than PRACTISE drops
(the DC-ViT paper's pairing), so those two rows compare at equal MACs.
"""
from __future__ import annotations

import csv
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .atomic import atomic_open, save_figure
from .engine import build_engine
from .errors import InputError
from .macs import count_macs
from .reference import ViTReference
from .throughput import measure_throughput


@dataclass
class SweepRow:
    method: str
    target: float | None        # fraction of the teacher's MACs asked for (None: the teacher)
    macs: int
    macs_ratio: float           # reached MACs / teacher MACs
    params: int
    top1: float | None          # on the labeled evaluation images (None without labels)
    agreement: float            # top-1 agreement with the teacher
    latency_ms: float           # one batch of latency_batch images on the engine
    images_per_s: float
    compress_s: float
    seed: int | None = None     # the few-shot draw (image subset, metric set, method seed)
    budget: str = "-"           # finetuning iterations: the student's (+ spent on selection)
    blocks: str = "-"           # chosen blocks and every candidate's score (DC-ViT, PRACTISE)


@torch.no_grad()
def predict(model, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Class predictions of `model` (an Engine or module) for (N, C, H, W) images."""
    return torch.cat([model(images[i:i + batch_size]).argmax(-1) for i in range(0, len(images), batch_size)])


def evaluate_row(method: str, target: float | None, model: ViTReference, teacher_macs: int,
                 eval_images: torch.Tensor, eval_labels: torch.Tensor | None,
                 teacher_preds: torch.Tensor | None, *, device="cpu", backend=None,
                 latency_batch: int = 32, compress_s: float = 0.0, **extra) -> SweepRow:
    engine = build_engine(model, backend=backend, device=device)
    inputs = eval_images.to(device)
    preds = predict(engine, inputs).cpu()
    top1 = None
    if eval_labels is not None and (eval_labels >= 0).all():
        top1 = (preds == eval_labels).float().mean().item()
    agreement = 1.0 if teacher_preds is None else (preds == teacher_preds).float().mean().item()
    timing = measure_throughput(engine, inputs[:latency_batch], warmup=2, repeats=7)
    macs = count_macs(model.spec).total
    return SweepRow(method=method, target=target, macs=macs, macs_ratio=macs / teacher_macs,
                    params=sum(p.numel() for p in model.parameters()), top1=top1, agreement=agreement,
                    latency_ms=timing.median_ms, images_per_s=timing.images_per_s, compress_s=compress_s,
                    **extra)


PAIRED = "dcvit@practise"  # the method name of DC-ViT rows run at PRACTISE's MACs points
BUDGETS = ("equal", "official")


@dataclass
class Draw:
    """One few-shot draw: the seed every method gets, its images and any extra options
    (e.g. the metric set) passed to the methods that take them."""
    seed: int
    images: torch.Tensor
    options: dict = field(default_factory=dict)


def equal_macs_pairs(spec, targets, practise_options: dict | None = None) -> dict[float, tuple[float, int]]:
    """target -> (PRACTISE's reached MACs ratio, DC-ViT block count = PRACTISE's + 1).

    Raises ValueError naming the target when DC-ViT cannot reach that MACs point with one
    block more (e.g. PRACTISE drops every candidate block)."""
    from .compress.structure import plan_block_drop, plan_dcvit

    candidates = (practise_options or {}).get("candidates")
    rounding = (practise_options or {}).get("rounding", "nearest")
    pairs = {}
    for target in targets:
        drop = plan_block_drop(spec, target, candidates=candidates, rounding=rounding)
        ratio = drop.macs / drop.teacher_macs
        try:
            plan_dcvit(spec, ratio, num_blocks=drop.blocks_dropped + 1, candidates=candidates)
        except ValueError as err:
            raise InputError(f"target {target:.2f} has no equal-MACs pair: PRACTISE drops "
                             f"{drop.blocks_dropped} blocks ({100 * ratio:.1f}% of the MACs) and DC-ViT "
                             f"cannot compress {drop.blocks_dropped + 1} blocks to that ({err}); choose a "
                             "higher target or turn pairing off") from None
        pairs[target] = (ratio, drop.blocks_dropped + 1)
    return pairs


def _budget_options(method: str, options: dict, spec, target: float, budget: str) -> dict:
    """With the equal budget, a DC-ViT student gets `iters` finetuning iterations in total
    (split over its progressive steps) and scores candidates after `iters` iterations."""
    if budget == "official" or method not in ("dcvit", PAIRED):
        return options
    from .compress.api import method_defaults
    from .compress.structure import plan_dcvit

    plan_options = {k: options[k] for k in ("num_blocks", "candidates", "round_to") if k in options}
    steps = plan_dcvit(spec, target, **plan_options).blocks_compressed
    total = options.get("iters", method_defaults("dcvit")["iters"])
    return dict(options, iters=max(1, total // steps), select_iters=options.get("select_iters") or total)


def selection_cost(method: str, options: dict, spec, targets, budget: str = "equal") -> str:
    """One line: the finetuning iterations `method` spends choosing its structure per seed
    over all `targets` (and what the student gets), from the options the sweep passes and the
    method's own defaults; said before a sweep runs, since selection can cost more than the
    students themselves. The metric set is not counted (the sweep makes one per seed)."""
    from .compress.api import method_defaults
    from .compress.structure import default_candidates

    function = "dcvit" if method == PAIRED else method
    defaults = method_defaults(function)

    def value(name):
        return options[name] if options.get(name) is not None else defaults.get(name)

    candidates = len(value("candidates") or default_candidates(spec)) if "candidates" in defaults else 0
    count = len(targets)
    if function == "dcvit":
        chosen = []
        for target in targets:
            try:
                chosen.append(_budget_options(method, dict(options), spec, target, budget))
            except ValueError:  # a target the method cannot reach is skipped by the sweep too
                count -= 1
        if not chosen:
            return f"{method}: reaches none of the targets"
        select = [o.get("select_iters") or o.get("iters") or defaults["iters"] for o in chosen]
        return (f"{method}: selection {candidates} candidates x {select[0]} iterations per target = "
                f"{candidates * sum(select)} over {count} target(s) (on the metric set); student "
                f"{value('iters')} "
                f"iterations{' in total' if budget == 'equal' else ' per progressive step'} per target")
    if function == "practise":
        adaptor = value("adaptor_iters") or value("iters")
        return (f"{method}: selection {candidates} candidates x {adaptor} adaptor iterations = "
                f"{candidates * adaptor}, once (scores are reused across targets); student "
                f"{value('iters')} iterations per target")
    if "finetune_iters" in defaults:  # a structure search, then a finetune (UVC, CaiT)
        return (f"{method}: search {value('iters')} iterations per target = {value('iters') * count} "
                f"over {count} target(s); student {value('finetune_iters')} iterations per target")
    if "iters" not in defaults:
        return f"{method}: no selection and no training (training-free)"
    return f"{method}: {value('iters')} iterations per target (selection cost not itemized)"


def _budget_text(report: dict) -> str:
    """The report's finetune_iters as the FT iters column: the student's iterations (steps x
    per step) and those spent choosing the structure; "-" for a training-free method."""
    spent = report.get("finetune_iters") or {}
    if not spent.get("student") and not spent.get("selection"):
        return "-"
    per_step = f"{spent['steps']}x{spent['per_step']}" if spent["steps"] > 1 else str(spent["student"])
    return f"{per_step} (+{spent['selection']} sel)"


def _blocks_text(report: dict) -> str:
    extras = report.get("extras", {})
    if "block_scores" not in extras:
        return "-"
    scores = " ".join(f"{s['block']}:{s['score']:.4g}" for s in sorted(extras["block_scores"],
                                                                      key=lambda s: s["block"]))
    return f"{extras['chosen_blocks']} of {scores}"


def run_sweep(teacher: ViTReference, images: torch.Tensor | None, eval_images: torch.Tensor,
              eval_labels: torch.Tensor | None, methods: dict[str, dict], targets, *,
              draws: list[Draw] | None = None, budget: str = "equal", pair: bool = True,
              first_draw_only=(), device="cpu", backend=None, latency_batch: int = 32, progress: bool = True,
              on_row=None, done=()) -> list[SweepRow]:
    """Compress `teacher` with every method at every target, for every draw, and evaluate
    each result.

    methods: {method name: keyword options for dcvit_engine.compress}. draws: the few-shot
    draws (default: one, `images` with each method's own seed). budget: "equal" (see the
    module docstring) or "official" (DC-ViT: `iters` per progressive step). pair: with both
    dcvit and practise, also run DC-ViT at PRACTISE's MACs points (method PAIRED); a target
    without such a pair raises ValueError before anything runs. on_row(row) is called as
    each row is ready. first_draw_only: methods run on the first draw only (to save time).
    Targets a method cannot reach are reported and skipped. done: sweep_state.row_key of
    the rows a resumed sweep has already (not run again, not returned).
    """
    from .compress import api
    from .sweep_state import row_key

    if budget not in BUDGETS:
        raise InputError(f"budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    if draws is None:
        draws = [Draw(seed=None, images=images)]
    if not draws:
        raise InputError("no few-shot draws: give at least one seed")
    if not methods:
        raise InputError("no methods to sweep: give at least one")
    targets = [float(t) for t in targets]
    if not targets or len(set(targets)) != len(targets):
        raise InputError(f"targets must be distinct and at least one, got {targets}")
    teacher = teacher.eval()
    spec = teacher.spec
    plan = [(m, t, dict(o)) for m, o in methods.items() for t in targets]
    if pair and "dcvit" in methods and "practise" in methods:
        pairs = equal_macs_pairs(spec, targets, methods["practise"])
        plan += [(PAIRED, ratio, dict(methods["dcvit"], num_blocks=blocks))
                 for ratio, blocks in pairs.values()]
    teacher_macs = count_macs(spec).total
    teacher_engine = build_engine(teacher, backend=backend, device=device)
    teacher_preds = predict(teacher_engine, eval_images.to(device)).cpu()
    rows = []
    if row_key("teacher", None, None) not in done:
        rows.append(evaluate_row("teacher", None, teacher, teacher_macs, eval_images, eval_labels, None,
                                 device=device, backend=backend, latency_batch=latency_batch))
        if on_row:
            on_row(rows[0])
    score_cache: dict = {}
    for index, draw in enumerate(draws):
        for method, target, options in plan:
            if index > 0 and method in first_draw_only:
                continue
            function = "dcvit" if method == PAIRED else method
            accepted = api.method_options(function)
            if draw.seed is not None and "seed" in accepted:
                options = dict(options, seed=draw.seed)
            options = dict(options, **{k: v for k, v in draw.options.items() if k in accepted})
            if "score_cache" in accepted:  # PRACTISE: block scores do not depend on the target
                options.setdefault("score_cache", score_cache)
            label = f"{method}-{options['recipe']}" if options.get("recipe", "shared") != "shared" else method
            if row_key(label, target, draw.seed) in done:
                continue
            try:
                options = _budget_options(method, options, spec, target, budget)
                report: dict = {}
                start = time.perf_counter()
                student = api.compress(teacher, draw.images, method=function, target_macs=target,
                                       progress=progress, report=report, **options)
            except ValueError as err:
                print(f"  {method} @ {target:.2f}: skipped ({err})")
                continue
            row = evaluate_row(label, target, student, teacher_macs, eval_images, eval_labels,
                               teacher_preds, device=device, backend=backend,
                               latency_batch=latency_batch, compress_s=time.perf_counter() - start,
                               seed=draw.seed, budget=_budget_text(report),
                               blocks=_blocks_text(report))
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


def summarize(rows: list[SweepRow]) -> list[dict]:
    """One entry per (method, target): the mean and standard deviation over seeds of
    top-1, agreement and MACs, the median latency, the mean compression time."""
    groups: dict[tuple, list[SweepRow]] = {}
    for row in rows:
        groups.setdefault((row.method, row.target), []).append(row)

    def stats(values):
        if any(v is None for v in values):
            return None, None
        t = torch.tensor(values, dtype=torch.float64)
        return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0

    summary = []
    for (method, target), group in groups.items():
        top1, top1_std = stats([r.top1 for r in group])
        agreement, agreement_std = stats([r.agreement for r in group])
        budgets = sorted({r.budget for r in group})
        summary.append(dict(
            method=method, target=target, seeds=len(group), macs=stats([r.macs for r in group])[0],
            macs_ratio=stats([r.macs_ratio for r in group])[0], params=stats([r.params for r in group])[0],
            top1=top1, top1_std=top1_std, agreement=agreement, agreement_std=agreement_std,
            latency_ms=float(torch.tensor([r.latency_ms for r in group]).median()),
            images_per_s=float(torch.tensor([r.images_per_s for r in group]).median()),
            compress_s=stats([r.compress_s for r in group])[0],
            budget=budgets[0] if len(budgets) == 1 else "/".join(budgets)))
    return summary


ROW_COLUMNS = ("method", "target (got)", "seed", "MACs%", "top1", "agree", "ms", "img/s", "FT iters", "s",
               "blocks of scores")
TABLE_COLUMNS = ("method", "target (got)", "MACs (M)", "MACs %", "params (K)", "top-1", "agree", "latency ms",
                 "img/s", "FT iters", "seeds", "time s")


def target_label(target: float | None, macs_ratio: float) -> str:
    """The target beside the MACs fraction reached, e.g. "0.75 (0.753)": whole-block methods
    land off their target, so rows with one label may differ in MACs."""
    return "-" if target is None else f"{target:.2f} ({macs_ratio:.3f})"


def table_line(row: SweepRow) -> tuple[str, ...]:
    """One seed's row as printed while the sweep runs (ROW_COLUMNS)."""
    return (row.method, target_label(row.target, row.macs_ratio),
            "-" if row.seed is None else str(row.seed), f"{100 * row.macs_ratio:.1f}",
            "-" if row.top1 is None else f"{100 * row.top1:.2f}", f"{100 * row.agreement:.1f}",
            f"{row.latency_ms:.2f}", f"{row.images_per_s:.0f}", row.budget, f"{row.compress_s:.0f}",
            row.blocks)


def _mean_std(mean: float | None, std: float | None, seeds: int) -> str:
    if mean is None:
        return "-"
    return f"{100 * mean:.2f}" if seeds == 1 else f"{100 * mean:.2f} ± {100 * std:.2f}"


def summary_line(entry: dict) -> tuple[str, ...]:
    return (entry["method"], target_label(entry["target"], entry["macs_ratio"]),
            f"{entry['macs'] / 1e6:.2f}", f"{100 * entry['macs_ratio']:.1f}", f"{entry['params'] / 1e3:.1f}",
            _mean_std(entry["top1"], entry["top1_std"], entry["seeds"]),
            _mean_std(entry["agreement"], entry["agreement_std"], entry["seeds"]),
            f"{entry['latency_ms']:.2f}", f"{entry['images_per_s']:.0f}", entry["budget"],
            str(entry["seeds"]), f"{entry['compress_s']:.0f}")


def format_table(rows: list[SweepRow]) -> str:
    """A Markdown table, one line per (method, target) with mean ± std over the seeds
    (readable in a terminal and pasteable into the README)."""
    lines = [TABLE_COLUMNS] + [summary_line(e) for e in summarize(rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(TABLE_COLUMNS))]
    fmt = lambda line: "| " + " | ".join(v.rjust(w) for v, w in zip(line, widths)) + " |"  # noqa: E731
    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(lines[0]), separator] + [fmt(line) for line in lines[1:]])


def write_csv(rows: list[SweepRow], path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_open(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    return path


def plot_sweep(rows: list[SweepRow], path: str | os.PathLike, title: str = "") -> Path:
    """Accuracy (top-1, else agreement; mean over seeds with ± one standard deviation as
    error bars) against MACs and against measured latency, one line per method, the
    teacher as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_top1 = all(r.top1 is not None for r in rows)
    key = "top1" if use_top1 else "agreement"
    summary = summarize(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in dict.fromkeys(e["method"] for e in summary):
        group = sorted((e for e in summary if e["method"] == method), key=lambda e: e["macs"])
        style = dict(marker="*", markersize=14, linestyle="none") if method == "teacher" else dict(marker="o")
        means = [100 * e[key] for e in group]
        errors = [100 * e[key + "_std"] for e in group]  # one standard deviation over the seeds
        for ax, x in ((axes[0], [e["macs"] / 1e6 for e in group]),
                      (axes[1], [e["latency_ms"] for e in group])):
            ax.errorbar(x, means, yerr=errors, label=method, capsize=3, **style)
    axes[0].set_xlabel("MACs per image (M)")
    axes[1].set_xlabel(f"latency of a batch of {rows[0].images_per_s * rows[0].latency_ms / 1e3:.0f} "
                       "images (ms, engine)")
    for ax in axes:
        ax.set_ylabel("top-1 (%)" if use_top1 else "agreement with teacher (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path, dpi=120)
    return path
