"""The DC-ViT paper's DeiT-B comparison as one run: DC-ViT against PRACTISE at the paper's
MACs points, with 50 / 100 / 500 / 1000 few-shot images and the official hyper-parameters,
evaluated on the ImageNet val split and printed beside the paper's numbers.

MACs points: PRACTISE drops k whole blocks (k = 1, 2, 3 of DeiT-B's 12: -8.3%, -16.6%,
-25% of the FLOPs); DC-ViT compresses k + 1 blocks to the same MACs (the paper's
pairing). Every finished run is recorded in results.json and every run checkpoints
into runs/<method>-n<samples>-k<k>/, so an interrupted reproduction resumes where it
stopped. Layer 5: orchestration over the compression methods and the data loader.
"""
from __future__ import annotations

import json
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
# Top-1 (%) the DC-ViT paper reports for DeiT-B (teacher 81.80), by PRACTISE's dropped blocks.
PAPER_DEIT_B = {2: dict(flops_cut=16.6, dcvit=81.26, practise=79.30, teacher=81.80)}
# The official settings (DC-ViT's code; PRACTISE's own recipe).
OFFICIAL = dict(iters=2000, batch_size=64, metric_size=50, metric_iters=2000)
METHODS = ("practise", "dcvit")
RESULTS = "results.json"


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
    """The fraction of the teacher's MACs left when PRACTISE drops `dropped` blocks."""
    from .compress.structure import plan_block_drop

    plan = plan_block_drop(spec, 0.999)
    return (plan.teacher_macs - dropped * plan.block_macs) / plan.teacher_macs


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


def run_reproduction(teacher: ViTReference, root, out, *, samples=SAMPLES, points=POINTS, seed: int = 0,
                     device="cpu", iters: int = OFFICIAL["iters"], batch_size: int = OFFICIAL["batch_size"],
                     metric_size: int = OFFICIAL["metric_size"], metric_iters: int = OFFICIAL["metric_iters"],
                     val_samples: int | None = None, preprocess=None,
                     progress: bool = True, on_result=None) -> dict:
    """Run (or resume) every (samples, point, method) of the comparison; returns the results
    dict also kept in out/results.json. on_result(entry) is called for each finished run.
    preprocess: the PreprocessConfig of every image read (default: the teacher's own)."""
    from .compress import api
    from .compress.metric_set import synthesize_metric_set
    from .compress.structure import plan_dcvit

    spec = teacher.spec
    train_dir, val_dir = imagenet_splits(root)
    config = preprocess or getattr(teacher, "preprocess", None) \
        or imagenet_default(spec.img_size, spec.in_chans)
    val = load_image_folder(val_dir, config, num_samples=val_samples, seed=seed, labeled=True)
    train_classes = load_image_folder(train_dir, config, num_samples=1, labeled=True).classes
    check_classes(train_classes, val.classes, spec)
    targets = {k: macs_point(spec, k) for k in points}
    for k, ratio in targets.items():  # refuse a point without a DC-ViT pair before any work
        plan_dcvit(spec, ratio, num_blocks=k + 1)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS
    results = load_json_file(results_path, hint="remove it to start over") if results_path.exists() else {}
    settings = dict(seed=seed, iters=iters, batch_size=batch_size, metric_size=metric_size,
                    metric_iters=metric_iters, val_samples=val_samples, val_images=len(val))
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
    metric_set = None
    for n in samples:
        images = None
        for k, ratio in targets.items():
            for method in METHODS:
                key = f"{method}-n{n}-k{k}"
                if key in runs:
                    continue
                if images is None:
                    images = load_image_folder(train_dir, config, num_samples=n, seed=seed,
                                               labeled=True).tensors()[0]
                if method == "dcvit":
                    if metric_set is None:  # one synthetic metric set for every DC-ViT run, cached
                        metric_set = synthesize_metric_set(
                            teacher, num_images=metric_size, iters=metric_iters, seed=seed,
                            mean=config.mean, std=config.std, device=device, cache_path=out / "metric_set.pt",
                            progress=progress).images
                    options = dict(target_macs=ratio, num_blocks=k + 1, metric_set=metric_set)
                else:  # PRACTISE's own recipe; its target sits just above the point to drop exactly k
                    options = dict(target_macs=ratio + 1e-6, recipe="official")
                report: dict = {}
                student = api.compress(teacher, images, method=method, iters=iters, batch_size=batch_size,
                                       seed=seed, device=device, checkpoint_dir=out / "runs" / key,
                                       resume=True, progress=progress, report=report, **options)
                runs[key] = dict(method=method, samples=n, dropped=k,
                                 top1=top1(student, val, batch_size, device),
                                 macs_ratio=count_macs(student).total / teacher_macs,
                                 chosen_blocks=report["extras"].get("chosen_blocks"),
                                 recipe=report["extras"].get("recipe", "official"))
                save()
                if on_result:
                    on_result(runs[key])
    return results


def results_table(results: dict) -> str:
    """Our top-1 beside the paper's, one line per (samples, point, method)."""
    lines = [("samples", "FLOPs cut", "method", "blocks", "top-1 (ours)", "top-1 (paper)")]
    teacher = results["teacher_top1"]
    paper_teacher = PAPER_DEIT_B[2]["teacher"]
    lines.append(("-", "0.0%", "teacher", "-", f"{teacher:.2f}", f"{paper_teacher:.2f}"))
    for run in sorted(results["runs"].values(), key=lambda r: (r["samples"], r["dropped"], r["method"])):
        paper = PAPER_DEIT_B.get(run["dropped"], {}).get(run["method"])
        blocks = run["dropped"] + (1 if run["method"] == "dcvit" else 0)
        lines.append((str(run["samples"]), f"{100 * (1 - run['macs_ratio']):.1f}%", run["method"],
                      f"{blocks} {'compressed' if run['method'] == 'dcvit' else 'dropped'}",
                      f"{run['top1']:.2f}", "-" if paper is None else f"{paper:.2f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    fmt = lambda line: "| " + " | ".join(v.rjust(w) for v, w in zip(line, widths)) + " |"  # noqa: E731
    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(lines[0]), separator] + [fmt(line) for line in lines[1:]])
