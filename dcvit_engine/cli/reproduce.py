"""`dcvit reproduce`: the DC-ViT paper's DeiT-B table (DC-ViT vs PRACTISE at the paper's MACs
points, 50/100/500/1000 images, official hyper-parameters) on your ImageNet copy, printed
beside the paper's numbers; resumable (run the same command again after an interruption)."""
import torch

from dcvit_engine.atomic import removed_if_left_empty
from dcvit_engine.cli import CommandError
from dcvit_engine.cli.data_args import add_preprocess_arguments, preprocess_from_args
from dcvit_engine.cli.model_args import add_model_arguments, model_from_args
from dcvit_engine.cli.option_types import nonnegative_int, positive_int
from dcvit_engine.devices import resolve_device
from dcvit_engine.errors import NoDeviceError


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


def register(subparsers):
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
    parser.add_argument("--device", default=None,
                        help="cuda (default, when present) or cpu (slow: hours per result)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args):
    from dcvit_engine.reproduce import PAPER_DEIT_B, results_table, run_reproduction

    samples, points = _ints(args.samples, "--samples"), _ints(args.points, "--points")
    device = reproduction_device(args.device)
    teacher, name = model_from_args(args)
    print(f"reproducing the DC-ViT paper's DeiT-B comparison with {name}: samples {samples}, PRACTISE "
          f"dropping {points} blocks (DC-ViT one more), {args.iters} iterations; paper numbers: DeiT-B at "
          f"-{PAPER_DEIT_B[2]['flops_cut']}% FLOPs")
    with removed_if_left_empty(args.out):
        results = run_reproduction(
            teacher, args.data, args.out, samples=samples, points=points, seed=args.seed, device=device,
            iters=args.iters, batch_size=args.batch_size, metric_size=args.metric_size,
            metric_iters=args.metric_iters, val_samples=args.val_samples,
            preprocess=preprocess_from_args(args, teacher),
            on_result=lambda r: print(f"  {r['method']} with {r['samples']} images, point {r['dropped']}: "
                                      f"top-1 {r['top1']:.2f}", flush=True))
    print("\n" + results_table(results))
    print(f"\nresults in {args.out}/results.json")
    return 0
