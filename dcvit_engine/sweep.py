"""Compress one teacher to a family of MACs targets with several methods and compare them.

Each row: the method, its target, the MACs and parameters it reached, top-1 on labeled
evaluation images, top-1 agreement with the teacher, and the latency measured on the engine
(the fused ops, on the device given). The same rows feed the `dcvit sweep` and `dcvit demo`
tables, CSV and plot.
"""
from __future__ import annotations

import csv
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .atomic import atomic_open, atomic_path
from .engine import build_engine
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


@torch.no_grad()
def predict(model, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Class predictions of `model` (an Engine or module) for (N, C, H, W) images."""
    return torch.cat([model(images[i:i + batch_size]).argmax(-1) for i in range(0, len(images), batch_size)])


def evaluate_row(method: str, target: float | None, model: ViTReference, teacher_macs: int,
                 eval_images: torch.Tensor, eval_labels: torch.Tensor | None,
                 teacher_preds: torch.Tensor | None, *, device="cpu", backend=None,
                 latency_batch: int = 32, compress_s: float = 0.0) -> SweepRow:
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
                    latency_ms=timing.median_ms, images_per_s=timing.images_per_s, compress_s=compress_s)


def run_sweep(teacher: ViTReference, images: torch.Tensor, eval_images: torch.Tensor,
              eval_labels: torch.Tensor | None, methods: dict[str, dict], targets, *,
              device="cpu", backend=None, latency_batch: int = 32, progress: bool = True,
              on_row=None) -> list[SweepRow]:
    """Compress `teacher` with every method at every target and evaluate each result.

    methods: {method name: keyword options for dcvit_engine.compress}. on_row(row) is
    called as each row is ready (the CLI prints it). Targets a method cannot reach (e.g.
    PRACTISE's whole-block steps, or an infeasible ratio) are reported and skipped.
    """
    from .compress import api

    teacher = teacher.eval()
    teacher_macs = count_macs(teacher.spec).total
    teacher_engine = build_engine(teacher, backend=backend, device=device)
    teacher_preds = predict(teacher_engine, eval_images.to(device)).cpu()
    rows = [evaluate_row("teacher", None, teacher, teacher_macs, eval_images, eval_labels, None,
                         device=device, backend=backend, latency_batch=latency_batch)]
    if on_row:
        on_row(rows[0])
    for method, options in methods.items():
        for target in targets:
            start = time.perf_counter()
            try:
                student = api.compress(teacher, images, method=method, target_macs=target,
                                       progress=progress, **options)
            except ValueError as err:
                print(f"  {method} @ {target:.2f}: skipped ({err})")
                continue
            row = evaluate_row(method, target, student, teacher_macs, eval_images, eval_labels,
                               teacher_preds, device=device, backend=backend,
                               latency_batch=latency_batch, compress_s=time.perf_counter() - start)
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


TABLE_COLUMNS = ("method", "target", "MACs (M)", "MACs %", "params (K)", "top-1", "agree", "latency ms", "img/s", "time s")


def table_line(row: SweepRow) -> tuple[str, ...]:
    return (row.method, "-" if row.target is None else f"{row.target:.2f}", f"{row.macs / 1e6:.1f}",
            f"{100 * row.macs_ratio:.1f}", f"{row.params / 1e3:.1f}",
            "-" if row.top1 is None else f"{100 * row.top1:.2f}", f"{100 * row.agreement:.1f}",
            f"{row.latency_ms:.2f}", f"{row.images_per_s:.0f}", f"{row.compress_s:.0f}")


def format_table(rows: list[SweepRow]) -> str:
    """A Markdown table (readable in a terminal and pasteable into the README)."""
    lines = [TABLE_COLUMNS] + [table_line(r) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(TABLE_COLUMNS))]
    fmt = lambda line: "| " + " | ".join(v.rjust(w) for v, w in zip(line, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(lines[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(l) for l in lines[1:]])


def write_csv(rows: list[SweepRow], path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_open(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    return path


def plot_sweep(rows: list[SweepRow], path: str | os.PathLike, title: str = "") -> Path:
    """Accuracy (top-1, else agreement) against MACs and against measured latency, one
    line per method, the teacher as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_top1 = all(r.top1 is not None for r in rows)
    score = (lambda r: 100 * r.top1) if use_top1 else (lambda r: 100 * r.agreement)  # noqa: E731
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in dict.fromkeys(r.method for r in rows):
        group = sorted((r for r in rows if r.method == method), key=lambda r: r.macs)
        style = dict(marker="*", markersize=14, linestyle="none") if method == "teacher" else dict(marker="o")
        axes[0].plot([r.macs / 1e6 for r in group], [score(r) for r in group], label=method, **style)
        axes[1].plot([r.latency_ms for r in group], [score(r) for r in group], label=method, **style)
    axes[0].set_xlabel("MACs per image (M)")
    axes[1].set_xlabel(f"latency of a batch of {rows[0].images_per_s * rows[0].latency_ms / 1e3:.0f} images (ms, engine)")
    for ax in axes:
        ax.set_ylabel("top-1 (%)" if use_top1 else "agreement with teacher (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return path
