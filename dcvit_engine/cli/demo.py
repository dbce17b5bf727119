"""`dcvit demo`: the whole pipeline on real data with nothing downloaded.

A small DeiT-style timm ViT is trained once on scikit-learn's handwritten digits (cached),
then compressed with each method at three MACs targets from at most 64 unlabeled training
images; every student is evaluated on the held-out digits and timed on the engine (CPU).
Prints the table and writes demo.csv and demo.png.
"""
import time
from pathlib import Path

import torch

from dcvit_engine.cli import CommandError

DEFAULT_TARGETS = "0.85,0.7,0.55"
DEFAULT_METHODS = "dcvit,practise,uvc,cait,tome"


def register(subparsers):
    parser = subparsers.add_parser("demo", help="train a digits teacher once, compress it with every method, compare")
    parser.add_argument("--out", default="dcvit_demo", help="output folder (default ./dcvit_demo)")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    parser.add_argument("--targets", default=DEFAULT_TARGETS, help=f"fractions of MACs kept (default {DEFAULT_TARGETS})")
    parser.add_argument("--num-samples", type=int, default=64, help="unlabeled few-shot images (default 64, at most 64)")
    parser.add_argument("--iters", type=int, default=150, help="finetuning iterations per step (default 150)")
    parser.add_argument("--metric-size", type=int, default=20, help="synthetic metric-set images (default 20)")
    parser.add_argument("--metric-iters", type=int, default=200, help="metric-set optimization steps (default 200)")
    parser.add_argument("--cache-dir", default=None, help="where the trained teacher is cached (default $DCVIT_CACHE or ~/.cache/dcvit_engine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args):
    from dcvit_engine.cli.sweep import _options_for, parse_targets
    from dcvit_engine.compress.api import METHODS
    from dcvit_engine.compress.metric_set import synthesize_metric_set
    from dcvit_engine.demo_teacher import DIGITS_SPLIT_SEED, demo_teacher, default_cache_dir
    from dcvit_engine.digits import DIGITS_MEAN, DIGITS_STD, digits_splits
    from dcvit_engine.reference import reference_from_timm
    from dcvit_engine.sweep import format_table, plot_sweep, run_sweep, table_line, write_csv

    if not 1 <= args.num_samples <= 64:
        raise CommandError(f"--num-samples must be between 1 and 64 (the demo is few-shot), got {args.num_samples}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise CommandError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    targets = parse_targets(args.targets)
    start = time.perf_counter()
    torch.manual_seed(args.seed)

    timm_teacher, info = demo_teacher(cache_dir=args.cache_dir, progress=True)
    source = "cached" if info["from_cache"] else f"trained in {info['train_seconds']:.0f} s"
    print(f"teacher: timm ViT {info['model_kwargs']} ({source}), test top-1 {info['test_top1']:.2f}%")
    teacher = reference_from_timm(timm_teacher)
    img_size = teacher.spec.img_size[0]
    # The teacher's own split: any other seed would put its training digits in the test set.
    train_x, _, test_x, test_y = digits_splits(img_size, seed=DIGITS_SPLIT_SEED)
    few_shot = train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(args.seed))[:args.num_samples]]
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    metric = synthesize_metric_set(teacher, num_images=args.metric_size, iters=args.metric_iters,
                                   img_size=teacher.spec.img_size, seed=args.seed,
                                   mean=DIGITS_MEAN, std=DIGITS_STD,
                                   cache_path=cache / f"demo_metric_set-{args.metric_size}-{args.metric_iters}-{args.seed}.pt",
                                   progress=True)
    metric_images = metric.images
    print(f"{args.num_samples} unlabeled few-shot digits; {len(metric_images)} synthetic metric-set images; "
          f"{len(test_x)} held-out test digits")

    shared = dict(iters=args.iters, batch_size=32, seed=args.seed, device="cpu", metric_set=metric_images)
    print(" | ".join(("method", "target", "MACs(M)", "MACs%", "params(K)", "top1", "agree", "ms", "img/s", "s")))
    rows = run_sweep(teacher, few_shot, test_x, test_y, {m: _options_for(m, shared) for m in methods},
                     targets, device="cpu", progress=False, latency_batch=64,
                     on_row=lambda row: print(" | ".join(table_line(row)), flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("\n" + format_table(rows))
    write_csv(rows, out / "demo.csv")
    plot_sweep(rows, out / "demo.png", title="dcvit demo: digits teacher compressed from "
                                             f"{args.num_samples} unlabeled images (CPU)")
    print(f"\nwrote {out / 'demo.csv'} and {out / 'demo.png'}; total {time.perf_counter() - start:.0f} s")
    return 0
