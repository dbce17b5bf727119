"""The DC-ViT paper's DeiT-B comparison as one run: DC-ViT against PRACTISE at the paper's
MACs points, with 50 / 100 / 500 / 1000 few-shot images and the official recipe, evaluated
on the ImageNet val split and printed as a table keyed by cell (images x FLOPs reduction),
with a paper number only where a named source gives one for that cell.

MACs points: PRACTISE drops k whole blocks (k = 1, 2, 3 of DeiT-B's 12: -8.3%, -16.6%,
-25% of the FLOPs); DC-ViT compresses k + 1 blocks to the same MACs (the paper's
pairing), with MLP widths from the official FLOPs count (macs_convention "official":
QK^T and A.V not counted; DeiT-B 2304 / 1536 / 1152). The official recipe is the default:
the DC-ViT scripts' few-shot augmentation (fewshot.official_augment), gradient clipping 1.0,
PRACTISE as the DC-ViT code ports it (practise recipe "official"), the official few-shot
draw (few_shot_draw: one image per class for 1000) and K seeds per cell. Every finished run
is recorded in results.json and checkpoints into runs/<method>-n<samples>-k<k>-s<seed>/, so
an interrupted reproduction resumes where it stopped. Layer 5: orchestration over the
compression methods and the data loader.

Every image (few_shot_draw's loads, and the val split in run_reproduction) is read with the
model's own preprocessing config (dcvit_engine.preprocess), or the one given: `dcvit
reproduce` gives the teacher's with the DC-ViT code's evaluation crop, Resize(256) +
CenterCrop(224) (crop_pct 0.875; timm's DeiT-B config says 0.9), bicubic.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .atomic import atomic_open
from .data import load_image_folder
from .errors import InputError
from .jsonfile import load_json_file
from .macs import count_macs
from .preprocess import imagenet_default
from .reference import ViTReference

SAMPLES = (50, 100, 500, 1000)
POINTS = (1, 2, 3)  # blocks PRACTISE drops; DC-ViT compresses one more
# Top-1 (%) for DeiT-B (teacher 81.80) by cell: (few-shot images or None when the source does
# not say, blocks PRACTISE drops). Each entry names its source; a cell not here prints "-".
SOURCES = {
    "secondary": ("a secondary summary of the DC-ViT paper gathered for this project (its seed "
                  "documents hold only the abstract; no primary source for these numbers is known "
                  "here); it gives no image count"),
}
PAPER_DEIT_B = {
    (None, 2): dict(flops_cut=16.6, dcvit=81.26, practise=79.30, teacher=81.80, source="secondary"),
}
# The official settings (DC-ViT's code; PRACTISE as that code ports it).
OFFICIAL = dict(iters=2000, batch_size=64, metric_size=50, metric_iters=2000, augment="official",
                macs_convention="official", max_grad_norm=1.0)
METHODS = ("practise", "dcvit")
RESULTS = "results.json"


def paper_cell(samples: int | None, dropped: int) -> dict | None:
    """The paper's numbers for a cell, or None when no named source gives that cell."""
    return PAPER_DEIT_B.get((samples, dropped))


def cells_without_paper(samples, points) -> list[tuple[int, int]]:
    """The requested (images, dropped blocks) cells that no source gives a paper number for."""
    return [(n, k) for n in samples for k in points if paper_cell(n, k) is None]


def imagenet_splits(root: str | os.PathLike) -> tuple[Path, Path]:
    """root/train and root/val, each with one subfolder per class, or a ValueError."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise InputError(f"ImageNet folder {root} does not exist; give the folder that holds train/ and val/")
    train, val = root / "train", root / "val"
    for split in (train, val):
        if not split.is_dir() or not any(p.is_dir() for p in split.iterdir()):
            raise InputError(f"{root} has no {split.name} split: expected {split}/<class>/<images> "
                             "(the ImageNet layout, val sorted into class subfolders)")
    return train, val


def check_classes(train_classes: list[str], val_classes: list[str], spec) -> None:
    """The train and val class folders must be the same and as many as the model's classes."""
    if train_classes != val_classes:
        only = sorted(set(train_classes) ^ set(val_classes))[:3]
        raise InputError(f"train and val have different class folders (e.g. {only}); "
                         "both need the same classes")
    if len(train_classes) != spec.num_classes:
        raise InputError(f"the folder has {len(train_classes)} classes but the model's head has "
                         f"{spec.num_classes}; give the dataset the model was trained on")


def macs_point(spec, dropped: int) -> float:
    """The fraction of the teacher's MACs (full count) left when PRACTISE drops `dropped` blocks."""
    from .compress.structure import plan_block_drop

    plan = plan_block_drop(spec, 0.999)
    return (plan.teacher_macs - dropped * plan.block_macs) / plan.teacher_macs


def convention_macs(spec_or_model, convention: str) -> int:
    """MACs in the convention: "full" (every matmul) or "official" (no QK^T, A.V: DC-ViT's)."""
    report = count_macs(spec_or_model)
    return report.total - (report.attention_matmuls if convention == "official" else 0)


def flops_cut(spec, dropped: int, convention: str) -> float:
    """The fraction of the teacher's MACs (in the convention) that `dropped` whole blocks
    remove: the cell's FLOPs reduction (DeiT-B, official count: 8.3 / 16.6 / 24.8%)."""
    from .compress.structure import compressed_spec, default_candidates

    blocks = default_candidates(spec)[:dropped]
    teacher = convention_macs(spec, convention)
    return 1 - convention_macs(compressed_spec(spec, blocks, 0), convention) / teacher


def few_shot_draw(train_dir: Path, classes: list[str], n: int, seed: int,
                  config) -> tuple[torch.Tensor, torch.Tensor]:
    """n training images as the official FewShotImageFolder draws them: n // C images of every
    one of the C classes (1000 images of ImageNet: one per class), and for the rest (all of
    them when n < C) one image each of as many random classes; seeded. Returns (images,
    labels). (The official draw picks those classes with replacement, so 50 of 1000 may
    repeat one; distinct classes here never ask a class for more images than it has.)"""
    generator = torch.Generator().manual_seed(seed)
    per_class = [n // len(classes)] * len(classes)
    for c in torch.randperm(len(classes), generator=generator)[:n % len(classes)].tolist():
        per_class[c] += 1
    images, labels = [], []
    for c, count in enumerate(per_class):
        if count:
            data = load_image_folder(train_dir / classes[c], config, num_samples=count,
                                     seed=seed * 1_000_003 + c, labeled=False)
            images.append(data.tensors()[0])
            labels += [c] * count
    return torch.cat(images), torch.tensor(labels, dtype=torch.long)


@torch.no_grad()
def top1(model: ViTReference, data, batch_size: int, device) -> float:
    """Top-1 (%) of the model on an ImageFolderData, streamed in batches."""
    model = model.to(device).eval()
    correct = total = 0
    for images, labels in data.loader(batch_size=batch_size):
        predictions = model(images.to(device)).argmax(-1).cpu()
        correct += int((predictions == labels).sum())
        total += len(labels)
    return 100.0 * correct / total


def run_reproduction(teacher: ViTReference, root, out, *, samples=SAMPLES, points=POINTS, seeds=(0,),
                     device="cpu", iters: int = OFFICIAL["iters"], batch_size: int = OFFICIAL["batch_size"],
                     metric_size: int = OFFICIAL["metric_size"], metric_iters: int = OFFICIAL["metric_iters"],
                     macs_convention: str = OFFICIAL["macs_convention"], val_samples: int | None = None,
                     preprocess=None, progress: bool = True, on_result=None) -> dict:
    """Run (or resume) every (samples, point, seed, method) of the comparison; returns the
    results dict also kept in out/results.json. on_result(entry) is called for each finished
    run. macs_convention: how DC-ViT's structure formula counts MACs (see the module docstring).
    preprocess: the PreprocessConfig of every image read (default: the teacher's own)."""
    from .compress import api
    from .compress.metric_set import synthesize_metric_set
    from .compress.structure import MACS_CONVENTIONS, plan_dcvit

    if macs_convention not in MACS_CONVENTIONS:
        raise ValueError(f"macs_convention must be one of {', '.join(MACS_CONVENTIONS)}, "
                         f"got {macs_convention!r}")
    spec = teacher.spec
    train_dir, val_dir = imagenet_splits(root)
    config = preprocess or getattr(teacher, "preprocess", None) \
        or imagenet_default(spec.img_size, spec.in_chans)
    val = load_image_folder(val_dir, config, num_samples=val_samples, seed=seeds[0], labeled=True)
    classes = load_image_folder(train_dir, config, num_samples=1, labeled=True).classes
    check_classes(classes, val.classes, spec)
    teacher_conv = convention_macs(spec, macs_convention)
    targets = {k: 1 - flops_cut(spec, k, macs_convention) for k in points}  # in the convention
    for k, ratio in targets.items():  # refuse a point without a DC-ViT pair before any work
        plan_dcvit(spec, ratio, num_blocks=k + 1, macs_convention=macs_convention)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS
    results = load_json_file(results_path, hint="remove it to start over") if results_path.exists() else {}
    settings = dict(iters=iters, batch_size=batch_size, metric_size=metric_size, metric_iters=metric_iters,
                    val_samples=val_samples, val_images=len(val), macs_convention=macs_convention,
                    augment=OFFICIAL["augment"], max_grad_norm=OFFICIAL["max_grad_norm"],
                    preprocess=config.to_dict())
    if results.get("settings", settings) != settings:
        raise InputError(f"{results_path} was made with other settings ({results['settings']}); "
                         "use another --out or the same settings")
    results["settings"] = settings
    runs = results.setdefault("runs", {})

    def save():
        with atomic_open(results_path) as f:
            json.dump(results, f, indent=1)

    if "teacher_top1" not in results:
        results["teacher_top1"] = top1(teacher, val, batch_size, device)
        save()
    teacher_macs = count_macs(spec).total
    for seed in seeds:
        metric_set = None
        for n in samples:
            images = None
            for k, ratio in targets.items():
                for method in METHODS:
                    key = f"{method}-n{n}-k{k}-s{seed}"
                    if key in runs:
                        continue
                    if images is None:
                        images, _ = few_shot_draw(train_dir, classes, n, seed, config)
                    shared = dict(augment=OFFICIAL["augment"])
                    if method == "dcvit":
                        if metric_set is None:  # one synthetic metric set per seed, cached
                            metric_set = synthesize_metric_set(
                                teacher, num_images=metric_size, iters=metric_iters, seed=seed,
                                mean=config.mean, std=config.std, device=device,
                                cache_path=out / f"metric_set-s{seed}.pt", progress=progress).images
                        options = dict(shared, target_macs=ratio, num_blocks=k + 1, metric_set=metric_set,
                                       macs_convention=macs_convention,
                                       max_grad_norm=OFFICIAL["max_grad_norm"])
                    else:  # PRACTISE as DC-ViT's code; its target sits just above the point to drop exactly k
                        options = dict(shared, target_macs=macs_point(spec, k) + 1e-6, recipe="official")
                    report: dict = {}
                    student = api.compress(teacher, images, method=method, iters=iters,
                                           batch_size=batch_size, seed=seed, device=device,
                                           checkpoint_dir=out / "runs" / key, resume=True,
                                           progress=progress, report=report, **options)
                    plan = report["extras"].get("plan", {})
                    runs[key] = dict(method=method, samples=n, dropped=k, seed=seed,
                                     top1=top1(student, val, batch_size, device),
                                     macs_ratio=count_macs(student).total / teacher_macs,
                                     flops_cut=1 - convention_macs(student, macs_convention) / teacher_conv,
                                     hidden_width=plan.get("hidden_width") if method == "dcvit" else None,
                                     chosen_blocks=report["extras"].get("chosen_blocks"),
                                     recipe=report["extras"].get("recipe", "official"))
                    save()
                    if on_result:
                        on_result(runs[key])
    return results


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.2f} ± {std:.2f}"


def results_table(results: dict) -> str:
    """One line per cell (images x FLOPs reduction) and method: our top-1 (mean ± std over the
    seeds, their count stated) beside the paper's where a named source gives that cell, "-"
    elsewhere; the paper's cells that were not run get a line of their own. Notes name the
    sources and the MACs convention."""
    convention = results.get("settings", {}).get("macs_convention", "full")
    head = ("images", "FLOPs cut", "method", "blocks", "seeds", "top-1 (ours)", "top-1 (paper)", "source")
    lines = [head]
    teacher_paper = PAPER_DEIT_B[(None, 2)]
    lines.append(("-", "0.0%", "teacher", "-", "-", f"{results['teacher_top1']:.2f}",
                  f"{teacher_paper['teacher']:.2f}", f"[{teacher_paper['source']}]"))
    groups: dict[tuple, list[dict]] = {}
    for run in results["runs"].values():
        groups.setdefault((run["samples"], run["dropped"], run["method"]), []).append(run)
    used = {teacher_paper["source"]}
    for (n, k, method), runs in sorted(groups.items()):
        paper = paper_cell(n, k)
        blocks = f"{k + 1} compressed" if method == "dcvit" else f"{k} dropped"
        if method == "dcvit" and runs[0].get("hidden_width") is not None:
            blocks += f" (MLP {runs[0]['hidden_width']})"
        cut = sum(r.get("flops_cut", 1 - r["macs_ratio"]) for r in runs) / len(runs)
        lines.append((str(n), f"{100 * cut:.1f}%", method, blocks, str(len(runs)),
                      _mean_std([r["top1"] for r in runs]),
                      "-" if paper is None else f"{paper[method]:.2f}",
                      "-" if paper is None else f"[{paper['source']}]"))
        if paper is not None:
            used.add(paper["source"])
    for (n, k), paper in sorted(PAPER_DEIT_B.items(), key=lambda item: (item[0][0] or 0, item[0][1])):
        if any((n, k) == (gn, gk) for gn, gk, _ in groups):
            continue
        for method in METHODS:
            blocks = f"{k + 1} compressed" if method == "dcvit" else f"{k} dropped"
            lines.append(("not stated" if n is None else str(n), f"{paper['flops_cut']:.1f}%", method,
                          blocks, "-", "-", f"{paper[method]:.2f}", f"[{paper['source']}]"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    fmt = lambda line: "| " + " | ".join(v.rjust(w) for v, w in zip(line, widths)) + " |"  # noqa: E731
    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    notes = [f"[{name}] {SOURCES[name]}" for name in sorted(used)]
    notes.append("Paper numbers are DeiT-B's and print only in the cell (images x FLOPs cut) their "
                 "source gives; '-': no sourced number for that cell.")
    notes.append(f"FLOPs cut in the {convention} MACs count"
                 + (" (DC-ViT's: QK^T and A.V not counted)." if convention == "official" else
                    " (every matmul)."))
    return "\n".join([fmt(lines[0]), separator] + [fmt(line) for line in lines[1:]] + [""] + notes)
