"""Method benchmark: does each compression method's smaller model run faster on the engine
than the same compressed model in plain PyTorch (the reference module)?

For each method (UVC, CAIT, ToMe) a DeiT is compressed to each target with a few random
images (random weights and a short search: the structure a method finds decides the speed,
the accuracy of a random model means nothing), then timed:
  reference      the compressed model as a ViTReference (eager PyTorch, what a user of the
                 method's own code would run), and
  engine_<b>     build_engine(compressed, backend=b) for every backend the device has.
engine_vs_reference = engine images/s / reference images/s of the same compressed model.
realized = (engine images/s of the compressed model / engine images/s of the teacher, same
backend and batch) / (teacher MACs / compressed MACs): 1.0 means the removed MACs came back
in full as throughput.

  python benchmarks/bench_methods.py --device cpu --out bench_out   # deit_tiny, fp32, batch 1 and 8
  python benchmarks/bench_methods.py --out bench_out                # GPU: bf16, deit_tiny/small/base
Writes methods.csv into --out and prints the table.
"""
import argparse
import copy
import os
import sys
import time

import torch

from dcvit_engine.compress import api
from dcvit_engine.engine import build_engine, parse_dtype
from dcvit_engine.macs import count_macs
from dcvit_engine.models import resolve_model
from dcvit_engine.ops import BACKENDS, BackendUnavailableError
from dcvit_engine.reference import ViTReference
from dcvit_engine.throughput import measure_throughput

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import write_rows_csv  # noqa: E402

MODELS = {"deit_tiny": "deit_tiny_patch16_224", "deit_small": "deit_small_patch16_224",
          "deit_base": "deit_base_patch16_224"}
METHODS = ("uvc", "cait", "tome")
FIELDS = ["model", "method", "target", "gmacs", "macs_reduction", "structure", "compress_s", "runner",
          "batch_size", "images_per_s", "median_ms", "engine_vs_reference", "realized"]


def method_options(method: str, args) -> dict:
    """A short search: enough to produce the method's structure, not a trained model."""
    if method == "tome":
        return {}
    return dict(iters=args.search_iters, finetune_iters=0, batch_size=8, device=args.device, seed=0)


def describe(spec, teacher) -> str:
    """What the method kept, against the teacher: heads, q/k and v widths, MLP, merges."""
    def totals(sp):
        attn = [b.attn for b in sp.blocks if b.attn is not None]
        return (sum(a.num_heads for a in attn), sum(a.qk_total for a in attn), sum(a.v_total for a in attn),
                sum(b.mlp_hidden for b in sp.blocks))
    kept, full = totals(spec), totals(teacher)
    parts = [f"{name} {k}/{f}" for name, k, f in zip(("heads", "qk", "v", "mlp"), kept, full)]
    merges = [f"{i}:{b.merge.axis or b.merge.r}" for i, b in enumerate(spec.blocks) if b.merge is not None]
    if merges:
        parts.append("merges " + " ".join(merges))
    return ", ".join(parts)


def engine_backends(device: torch.device) -> list[str]:
    # the Triton interpreter on the CPU is a testing tool, far too slow to time
    return [b for b in BACKENDS if not (device.type == "cpu" and b in ("cuda", "triton"))
            and not (device.type == "cuda" and b == "cpu")]


def time_runners(model: ViTReference, label: dict, args, device, dtype, rows: list, log) -> None:
    spec = model.spec
    # a copy: casting in place would change the teacher that the methods then compress
    runners = {"reference": copy.deepcopy(model).to(device=device, dtype=dtype).eval()}
    for backend in engine_backends(device):
        engine = build_engine(model, backend=backend, dtype=dtype, device=device)
        probe = torch.randn(1, spec.in_chans, *spec.img_size, device=device, dtype=dtype)
        try:
            engine(probe)
        except BackendUnavailableError as err:
            log(f"skip engine backend {backend}: {str(err).splitlines()[0]}")
            continue
        runners[f"engine_{backend}"] = engine
    for batch in args.batch_sizes:
        images = torch.randn(batch, spec.in_chans, *spec.img_size, device=device, dtype=dtype)
        for name, runner in runners.items():
            timing = measure_throughput(runner, images, warmup=args.warmup, repeats=args.repeats)
            rows.append(dict(label, runner=name, batch_size=batch, images_per_s=timing.images_per_s,
                             median_ms=timing.median_ms))
            log(f"{label['model']:10} {label['method']:8} {label['target']:>6} {name:13} batch {batch:3}: "
                f"{timing.images_per_s:9.1f} images/s")


def bench_model(short: str, args, device, dtype, rows: list, log) -> None:
    teacher = resolve_model(model_name=MODELS[short])
    spec = teacher.spec
    teacher_macs = count_macs(spec).total
    few_shot = torch.randn(args.num_images, spec.in_chans, *spec.img_size)

    def label(method, target, model, seconds):
        macs = count_macs(model.spec).total
        return dict(model=short, method=method, target=target, gmacs=macs / 1e9,
                    macs_reduction=teacher_macs / macs, structure=describe(model.spec, spec),
                    compress_s=seconds)

    time_runners(teacher, label("teacher", "-", teacher, 0.0), args, device, dtype, rows, log)
    for method in args.methods:
        for target in args.targets:
            start = time.perf_counter()
            student = api.compress(teacher, few_shot, method=method, target_macs=target,
                                   **method_options(method, args))
            seconds = time.perf_counter() - start
            log(f"{short} {method} {target}: compressed in {seconds:.1f} s ({describe(student.spec, spec)})")
            time_runners(student, label(method, target, student, seconds), args, device, dtype, rows, log)


def add_speedups(rows: list[dict]) -> None:
    reference = {(r["model"], r["method"], r["target"], r["batch_size"]): r["images_per_s"]
                 for r in rows if r["runner"] == "reference"}
    teacher = {(r["model"], r["runner"], r["batch_size"]): r["images_per_s"]
               for r in rows if r["method"] == "teacher"}
    for r in rows:
        same_model = reference[(r["model"], r["method"], r["target"], r["batch_size"])]
        r["engine_vs_reference"] = r["images_per_s"] / same_model
        teacher_images_per_s = teacher[(r["model"], r["runner"], r["batch_size"])]
        r["realized"] = r["images_per_s"] / teacher_images_per_s / r["macs_reduction"]


def format_table(rows: list[dict]) -> str:
    header = (f"{'model':10} {'method':8} {'target':>6} {'GMACs':>6} {'MACs red.':>9} {'runner':13} "
              f"{'batch':>5} {'images/s':>9} {'ms':>8} {'vs ref':>6} {'realized':>8}  structure")
    lines = [header]
    for r in rows:
        lines.append(f"{r['model']:10} {r['method']:8} {r['target']:>6} {r['gmacs']:6.3f} "
                     f"{r['macs_reduction']:9.3f} {r['runner']:13} {r['batch_size']:5} "
                     f"{r['images_per_s']:9.1f} {r['median_ms']:8.2f} {r['engine_vs_reference']:6.3f} "
                     f"{r['realized']:8.3f}  {r['structure']}")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default bf16 on CUDA, float32 on the CPU")
    parser.add_argument("--models", default=None,
                        help=f"comma list of {sorted(MODELS)} (default all on CUDA, deit_tiny on the CPU)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of uvc, cait, tome")
    parser.add_argument("--targets", default="0.6", help="comma list of MACs fractions to keep")
    parser.add_argument("--batch-sizes", default=None,
                        help="comma list (default 1,64,256 on CUDA, 1,8 on the CPU)")
    parser.add_argument("--search-iters", type=int, default=None,
                        help="UVC / CAIT search steps (default 50 on CUDA, 8 on the CPU)")
    parser.add_argument("--num-images", type=int, default=16, help="few-shot images (random)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs (default 20 on CUDA, 5 on the CPU)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed runs (default 5 on CUDA, 1 on the CPU)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    gpu = args.device.startswith("cuda")
    args.dtype = parse_dtype(args.dtype or ("bf16" if gpu else "float32"))
    args.models = (args.models or ("deit_tiny,deit_small,deit_base" if gpu else "deit_tiny")).split(",")
    args.methods = [m for m in args.methods.split(",") if m]
    for name, chosen, known in (("model", args.models, MODELS), ("method", args.methods, METHODS)):
        unknown = [c for c in chosen if c not in known]
        if unknown:
            parser.error(f"unknown {name}(s) {unknown}; choose from {sorted(known)}")
    args.targets = [float(t) for t in args.targets.split(",") if t]
    args.batch_sizes = [int(b) for b in (args.batch_sizes or ("1,64,256" if gpu else "1,8")).split(",")]
    args.search_iters = args.search_iters or (50 if gpu else 8)
    args.repeats = args.repeats or (20 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    what = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads")
    print(f"{what}, {args.dtype}, batch sizes {args.batch_sizes}, targets {args.targets}", flush=True)
    start = time.perf_counter()
    rows: list[dict] = []
    for short in args.models:
        bench_model(short, args, device, args.dtype, rows, log=lambda line: print(line, flush=True))
    add_speedups(rows)
    print("\n" + format_table(rows))
    write_rows_csv(rows, FIELDS, os.path.join(args.out, "methods.csv"))
    print(f"\nwrote {args.out}/methods.csv ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
