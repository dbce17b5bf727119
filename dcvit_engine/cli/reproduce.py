"""`dcvit reproduce`: the DC-ViT paper's DeiT-B table (DC-ViT vs PRACTISE at the paper's MACs
points, 50/100/500/1000 images, the official recipe, --seeds draws per cell) on your ImageNet
copy, one line per cell (images x FLOPs cut) with the paper's number where a named source
gives that cell; resumable (run the same command again after an interruption)."""
import torch

from dcvit_engine.atomic import removed_if_left_empty
from dcvit_engine.cli import CommandError, resume_command
from dcvit_engine.cli.data_args import add_preprocess_arguments, preprocess_from_args
from dcvit_engine.cli.model_args import add_model_arguments, model_from_args
from dcvit_engine.cli.option_types import nonnegative_int, positive_int
from dcvit_engine.devices import resolve_device
from dcvit_engine.errors import NoDeviceError
from dcvit_engine.presets import gpu_sized_note
from dcvit_engine.progress import DEEPINVERSION, TRAINING, RunProgress


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CommandError(f"{what} must be comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise CommandError(f"{what} must be positive whole numbers, got {text!r}")
    return values


def reproduction_device(device: str | None) -> str:
    """--device as given (checked), else CUDA; without CUDA the run is refused, saying how to
    run on the CPU, rather than silently taking days there."""
    if device is not None:
        return str(resolve_device(device))
    if not torch.cuda.is_available():
        raise NoDeviceError("the reproduction runs on CUDA by default and no CUDA device is available "
                            "here; to run it on the CPU (hours per result at the official settings), "
                            "give --device cpu")
    return "cuda"


# The DC-ViT code evaluates with Resize(256) + CenterCrop(224): crop_pct 0.875, where timm's
# pretrained_cfg of DeiT-B says 0.9. The reproduction follows the official code unless
# --crop-pct is given.
OFFICIAL_CROP_PCT = 0.875


def official_eval_preprocess(args, teacher):
    """The teacher's preprocessing with the official evaluation's crop (unless --crop-pct)."""
    config = preprocess_from_args(args, teacher)
    return config if args.crop_pct is not None else config.replace(crop_pct=OFFICIAL_CROP_PCT)


def register(subparsers):
    from dcvit_engine.compress.structure import MACS_CONVENTIONS
    from dcvit_engine.reproduce import OFFICIAL, POINTS, SAMPLES

    parser = subparsers.add_parser(
        "reproduce", help="the DC-ViT paper's DeiT-B comparison on your ImageNet copy")
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, metavar="IMAGENET_DIR",
                        help="folder with train/<class>/ and val/<class>/ (the ImageNet layout)")
    parser.add_argument("--out", default="dcvit_reproduce",
                        help="results and checkpoints (default ./dcvit_reproduce)")
    parser.add_argument("--samples", default=",".join(map(str, SAMPLES)),
                        help=f"few-shot image counts (default {','.join(map(str, SAMPLES))})")
    parser.add_argument("--points", default=",".join(map(str, POINTS)),
                        help="MACs points as the blocks PRACTISE drops; DC-ViT compresses one more "
                        f"(default {','.join(map(str, POINTS))}: -8.3/-16.6/-25%% of DeiT-B's FLOPs)")
    parser.add_argument("--iters", type=nonnegative_int, default=OFFICIAL["iters"],
                        help=f"default {OFFICIAL['iters']} (official)")
    parser.add_argument("--batch-size", type=positive_int, default=OFFICIAL["batch_size"])
    parser.add_argument("--metric-size", type=positive_int, default=OFFICIAL["metric_size"])
    parser.add_argument("--metric-iters", type=nonnegative_int, default=OFFICIAL["metric_iters"])
    parser.add_argument("--val-samples", type=positive_int, default=None,
                        help="evaluate on this many val images (default all)")
    add_preprocess_arguments(parser)
    parser.add_argument("--macs-convention", choices=MACS_CONVENTIONS, default=OFFICIAL["macs_convention"],
                        help="how DC-ViT's structure formula counts MACs: official (default; the DC-ViT "
                        "code's count without QK^T and A.V: DeiT-B widths 2304/1536/1152) or full")
    parser.add_argument("--device", default=None,
                        help="cuda (default, when present) or cpu (slow: hours per result)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="few-shot draws per cell, seeds --seed.. (default 1 on ImageNet; the table "
                        "states the count)")
    parser.set_defaults(func=run)


def run(args):
    from dcvit_engine.reproduce import cells_without_paper, results_table, run_reproduction

    samples, points = _ints(args.samples, "--samples"), _ints(args.points, "--points")
    if args.seeds < 1:
        raise CommandError(f"--seeds must be a positive whole number, got {args.seeds}")
    device = reproduction_device(args.device)
    teacher, name = model_from_args(args)
    print(f"reproducing the DC-ViT paper's DeiT-B comparison with {name}: samples {samples}, PRACTISE "
          f"dropping {points} blocks (DC-ViT one more), {args.iters} iterations, {args.seeds} seed(s)")
    missing = cells_without_paper(samples, points)
    if missing:
        print("the paper has no sourced number for the cells (images, blocks PRACTISE drops) "
              f"{', '.join(f'({n}, {k})' for n, k in missing)}: their rows show '-' (the sourced "
              "numbers are DeiT-B at -16.6% FLOPs with the image count not stated)")
    args.on_interrupt = lambda: (f"kept the finished runs in {args.out}/results.json and the unfinished "
                                 f"run's checkpoint under {args.out}/runs; resume with the same command: "
                                 f"{resume_command(args, add=None)}")
    run_progress = RunProgress(reproduction_phases(teacher.spec.depth, samples, points, args))
    print(f"{run_progress.describe_plan()}; time: {run_progress.estimate_text()}, refined as it runs")
    note = gpu_sized_note(device, run_progress.total_steps, None, fix="lower --iters and --metric-iters "
                          "(e.g. 100), or run fewer --samples, --points or --seeds")
    if note:
        print(note)
    with removed_if_left_empty(args.out), run_progress:
        results = run_reproduction(
            teacher, args.data, args.out, samples=samples, points=points,
            seeds=tuple(range(args.seed, args.seed + args.seeds)), device=device,
            iters=args.iters, batch_size=args.batch_size, metric_size=args.metric_size,
            metric_iters=args.metric_iters, macs_convention=args.macs_convention,
            val_samples=args.val_samples, preprocess=official_eval_preprocess(args, teacher),
            on_result=lambda r: print(f"  {r['method']} with {r['samples']} images, point {r['dropped']}, "
                                      f"seed {r['seed']}: top-1 {r['top1']:.2f}", flush=True))
    print("\n" + results_table(results))
    print(f"\nresults in {args.out}/results.json")
    return 0


def reproduction_phases(depth: int, samples, points, args) -> list[tuple]:
    """The steps of every cell not yet in OUT/results.json: per seed one metric set, per cell
    DC-ViT (every candidate scored, then one progressive step per block) and PRACTISE
    (every candidate's adaptors, then the finetuning), --iters each, candidates all blocks but
    the first and the last (reproduce.run_reproduction's defaults)."""
    import json
    from pathlib import Path

    results = Path(args.out) / "results.json"
    done = set(json.loads(results.read_text()).get("runs", {})) if results.is_file() else set()
    candidates = depth - 2
    phases = []
    for seed in range(args.seed, args.seed + args.seeds):
        cells = [(n, k) for n in samples for k in points]
        if any(f"dcvit-n{n}-k{k}-s{seed}" not in done for n, k in cells):
            phases.append((f"metric set seed {seed}", args.metric_iters, DEEPINVERSION))
        for n, k in cells:
            if f"dcvit-n{n}-k{k}-s{seed}" not in done:
                phases.append((f"dcvit {n} images point {k}", (candidates + k + 1) * args.iters, TRAINING))
            if f"practise-n{n}-k{k}-s{seed}" not in done:
                phases.append((f"practise {n} images point {k}", (candidates + 1) * args.iters, TRAINING))
    return phases
