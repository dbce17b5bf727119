"""UVC's two gate modes on the demo teacher: the rows of docs/METHODS.md's UVC table.

Each run is `compress_uvc` with its own defaults (200 search steps, 200 distillation steps,
batch 32) on the demo's first few-shot draw (64 unlabeled digits of seed 0, as `dcvit demo`
draws them), on the CPU; top-1 is on the 450 held-out digits, through the engine as the
demo evaluates. One line per run: MACs reached, top-1, blocks skipped, the share of the cut
the budget projection decided (`reallocated_share`), the searched structure's MACs, the
gate margins g1 - g0 and the wall time.

  python benchmarks/uvc_gates.py --gates official --targets 0.9,0.75,0.6
  python benchmarks/uvc_gates.py --depth 12 --gates guarded,official   # the 12-block teacher
"""
import argparse
import time

import torch

from dcvit_engine.compress.uvc import GATES, compress_uvc
from dcvit_engine.demo_teacher import DIGITS_SPLIT_SEED, DemoTeacherConfig, demo_teacher
from dcvit_engine.digits import digits_splits
from dcvit_engine.engine import build_engine
from dcvit_engine.reference import reference_from_timm
from dcvit_engine.sweep import predict


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=None, help="teacher depth (default: the demo's 6)")
    parser.add_argument("--gates", default="official", help=f"comma list of {', '.join(GATES)}")
    parser.add_argument("--targets", default="0.9,0.75,0.6", help="comma list of MACs fractions to keep")
    parser.add_argument("--num-samples", type=int, default=64, help="few-shot digits (the demo's 64)")
    parser.add_argument("--cache-dir", default=None, help="demo teacher cache (default: the demo's)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = DemoTeacherConfig() if args.depth is None else DemoTeacherConfig(depth=args.depth)
    timm_teacher, info = demo_teacher(cache_dir=args.cache_dir, config=config, progress=False)
    teacher = reference_from_timm(timm_teacher)
    train_x, _, test_x, test_y = digits_splits(teacher.spec.img_size[0], seed=DIGITS_SPLIT_SEED)
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))  # the demo's draw 0
    images = train_x[order[:args.num_samples]]
    print(f"teacher: depth {config.depth}, test top-1 {info['test_top1']:.2f}%", flush=True)
    for gates in args.gates.split(","):
        for target in (float(t) for t in args.targets.split(",")):
            report: dict = {}
            start = time.perf_counter()
            student = compress_uvc(teacher, images, target, gates=gates, device="cpu", seed=0, report=report)
            seconds = time.perf_counter() - start
            preds = predict(build_engine(student, device="cpu"), test_x)
            top1 = 100 * (preds == test_y).double().mean().item()
            extras = report["extras"]
            skipped = [i for i, s in enumerate(extras["final"]["skip"]) if s]
            margins = ", ".join(f"{m:.2f}" for m in extras["gate_margins"])
            print(f"gates {gates} target {target:.2f}: MACs {100 * report['achieved_ratio']:.1f}%, "
                  f"top-1 {top1:.2f}%, skipped {skipped or 'none'}, moved {extras['reallocated_share']:.2f}, "
                  f"searched {100 * extras['searched_macs'] / report['teacher_macs']:.1f}%, "
                  f"margins [{margins}], {seconds:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
