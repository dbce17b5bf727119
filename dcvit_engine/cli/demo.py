"""`dcvit demo`: the whole pipeline on real data with nothing downloaded.

A small DeiT-style timm ViT is trained once on scikit-learn's handwritten digits (cached),
then compressed with each method at three MACs targets from at most 64 unlabeled training
images; every student is evaluated on the held-out digits and timed on the engine (CPU).
DC-ViT and PRACTISE run over --seeds few-shot draws (mean ± std), with equal finetuning
budgets, and DC-ViT also at each PRACTISE MACs point (dcvit@practise); the other methods
run on the first draw. Prints the table and writes demo.csv and demo.png.

The defaults (targets where DC-ViT keeps 27-59% of the MLP; lr, iterations, no flips)
were chosen on the digits' training images only, never on the held-out digits: see the
README's demo section for the sweep. --iters, --lr and --augment (and batch size 32) are
DC-ViT's and PRACTISE's finetuning settings; UVC, CAIT and ToMe run with their own defaults.
"""
import time
from pathlib import Path

import torch

from dcvit_engine.cli import CommandError
from dcvit_engine.cli.option_types import nonnegative_int, positive_int
from dcvit_engine.cli.sweep import add_fairness_arguments
from dcvit_engine.errors import InputError

DEFAULT_TARGETS = "0.9,0.75,0.6"
DEFAULT_METHODS = "dcvit,practise,uvc,cait,tome"
SEEDED_METHODS = ("dcvit", "practise")  # the others run on the first draw only
DEFAULT_LR = 1e-3
DEFAULT_ITERS = 100


def register(subparsers):
    parser = subparsers.add_parser(
        "demo", help="train a digits teacher once, compress it with every method, compare")
    parser.add_argument("--out", default="dcvit_demo", help="output folder (default ./dcvit_demo)")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma-separated (default {DEFAULT_METHODS})")
    parser.add_argument("--targets", default=DEFAULT_TARGETS,
                        help=f"fractions of MACs kept (default {DEFAULT_TARGETS})")
    parser.add_argument("--num-samples", type=positive_int, default=64,
                        help="unlabeled few-shot images (default 64, at most 64)")
    parser.add_argument("--iters", type=nonnegative_int, default=DEFAULT_ITERS,
                        help=f"finetuning iterations of each DC-ViT/PRACTISE student "
                        f"(default {DEFAULT_ITERS}; UVC, CAIT and ToMe keep their own defaults)")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR,
                        help=f"DC-ViT/PRACTISE finetuning learning rate (default {DEFAULT_LR:g}; "
                        "the official 3e-5 is for DeiT-B over 2000 iterations)")
    parser.add_argument("--augment", default="shift",
                        help="DC-ViT/PRACTISE augmentation: shift (default; no flips for digits), "
                        "flip+shift, none")
    parser.add_argument("--metric-size", type=positive_int, default=20,
                        help="synthetic metric-set images (default 20)")
    parser.add_argument("--metric-iters", type=nonnegative_int, default=200,
                        help="metric-set optimization steps (default 200)")
    parser.add_argument("--cache-dir", default=None,
                        help="where the trained teacher is cached "
                        "(default $DCVIT_CACHE or ~/.cache/dcvit_engine)")
    parser.add_argument("--depth", type=positive_int, default=None,
                        help="teacher depth (default: the demo teacher's 6; 12, as DeiT, trains a second "
                        "teacher once and takes about twice as long)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    add_fairness_arguments(parser, default_seeds=3)
    parser.set_defaults(func=run)


def demo_options(method: str, args) -> dict:
    """What the demo sets for `method`: --iters, --lr, --augment and batch size 32 are DC-ViT's
    and PRACTISE's few-shot finetuning settings (chosen for this teacher, see the module
    docstring); every other method keeps its own defaults and only runs on the CPU."""
    if method in SEEDED_METHODS:
        return dict(iters=args.iters, batch_size=32, lr=args.lr, augment=args.augment, device="cpu")
    return dict(device="cpu")


def run(args):
    from dcvit_engine import sweep
    from dcvit_engine.cli.sweep import _options_for, parse_methods_targets_seeds
    from dcvit_engine.compress.augment import AUGMENTATIONS
    from dcvit_engine.compress.metric_set import synthesize_metric_set
    from dcvit_engine.demo_teacher import (
        DIGITS_SPLIT_SEED,
        DemoTeacherConfig,
        build_demo_model,
        default_cache_dir,
        demo_teacher,
    )
    from dcvit_engine.digits import DIGITS_MEAN, DIGITS_STD, digits_splits
    from dcvit_engine.reference import reference_from_timm

    if not 1 <= args.num_samples <= 64:
        raise CommandError("--num-samples must be between 1 and 64 (the demo is few-shot), "
                           f"got {args.num_samples}")
    methods, targets, seeds = parse_methods_targets_seeds(args)
    if args.augment not in AUGMENTATIONS:
        raise CommandError(f"--augment must be one of {', '.join(AUGMENTATIONS)}, got {args.augment!r}")
    if args.depth is not None and args.depth < 3:
        raise CommandError("--depth must be at least 3 (a first, a last and one candidate block), "
                           f"got {args.depth}")
    config = DemoTeacherConfig() if args.depth is None else DemoTeacherConfig(depth=args.depth)
    if args.pair and "dcvit" in methods and "practise" in methods:
        try:  # before the teacher is trained: the architecture alone decides
            sweep.equal_macs_pairs(reference_from_timm(build_demo_model(config.model_kwargs())).spec, targets)
        except InputError as err:
            raise CommandError(str(err)) from None
    start = time.perf_counter()
    torch.manual_seed(args.seed)

    timm_teacher, info = demo_teacher(cache_dir=args.cache_dir, config=config, progress=True)
    source = "cached" if info["from_cache"] else f"trained in {info['train_seconds']:.0f} s"
    print(f"teacher: timm ViT {info['model_kwargs']} ({source}), test top-1 {info['test_top1']:.2f}%")
    teacher = reference_from_timm(timm_teacher)
    img_size = teacher.spec.img_size[0]
    # The teacher's own split: any other seed would put its training digits in the test set.
    train_x, _, test_x, test_y = digits_splits(img_size, seed=DIGITS_SPLIT_SEED)
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    draws = []
    for seed in seeds:  # one few-shot draw per seed: its images, its metric set, the methods' seed
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
        # keyed by the teacher's settings too: a --depth 12 teacher must not evict the default's
        name = f"demo_metric_set-{config.cache_key()}-{args.metric_size}-{args.metric_iters}-{seed}.pt"
        metric = synthesize_metric_set(teacher, num_images=args.metric_size, iters=args.metric_iters,
                                       img_size=teacher.spec.img_size, seed=seed,
                                       mean=DIGITS_MEAN, std=DIGITS_STD,
                                       cache_path=cache / name,
                                       progress=True)
        draws.append(sweep.Draw(seed, train_x[order[:args.num_samples]], dict(metric_set=metric.images)))
    print(f"{args.num_samples} unlabeled few-shot digits and {args.metric_size} synthetic metric-set images "
          f"per seed, seeds {seeds.start}..{seeds.stop - 1}; {len(test_x)} held-out test digits")

    options = {m: _options_for(m, demo_options(m, args)) for m in methods}
    if "practise" in options and args.recipe != "shared":  # with PRACTISE's own SGD learning rate
        without_lr = {k: v for k, v in options["practise"].items() if k != "lr"}
        options["practise"] = dict(without_lr, recipe=args.recipe)
    print(" | ".join(sweep.ROW_COLUMNS))
    rows = sweep.run_sweep(teacher, None, test_x, test_y, options, targets, draws=draws, budget=args.budget,
                           pair=args.pair, first_draw_only=[m for m in methods if m not in SEEDED_METHODS],
                           device="cpu", progress=False, latency_batch=64,
                           on_row=lambda row: print(" | ".join(sweep.table_line(row)), flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("\n" + sweep.format_table(rows))
    sweep.write_csv(rows, out / "demo.csv")
    sweep.plot_sweep(rows, out / "demo.png", title="dcvit demo: digits teacher compressed from "
                                                   f"{args.num_samples} unlabeled images (CPU)")
    print(f"\nwrote {out / 'demo.csv'} and {out / 'demo.png'}; total {time.perf_counter() - start:.0f} s")
    return 0
