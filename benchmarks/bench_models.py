"""Model benchmark: images/s of timm eager, timm + torch.compile and the engine on each
available backend, for DeiT-T/S/B (and, with --models, DINOv2-S with registers, DINOv3-S and
EVA-02-S at their full sizes) uncompressed and DC-ViT-shaped variants across the dense
compression range (random weights; speed does not depend on them).

Variant N (1..6): N blocks lose their attention and their MLPs shrink to one hidden width,
DC-ViT's structure (dcvit_engine.compress.structure.plan_dcvit) for the target that removes
(N - 1/2) blocks' worth of MACs, i.e. the middle of the MACs range N blocks can cover.

realized speedup = (engine images/s of the variant / engine images/s of the uncompressed
model, same backend and batch) / (uncompressed MACs / variant MACs): 1.0 means the removed
MACs came back in full as throughput.

floor = the time the model's FLOPs (2 x MACs x batch) take at the matmul peak measured in the
same run and dtype (timing.matmul_peak_tflops); of_floor = floor / measured time, the share of
the peak a runner reaches (1.0 is the ceiling).

All runners of one model and batch size are timed interleaved (timing.time_interleaved: one
call of each per round, median per runner), not one runner after the other: on a shared
machine the load drifts, and runners timed minutes apart would be compared under different
loads (the CPU's engine / timm ratios moved by up to 2x between runs that way).

  python benchmarks/bench_models.py --out bench_out                 # GPU: bf16, batch 1,64,256, DeiT-T/S/B
  python benchmarks/bench_models.py --device cpu --out bench_out    # CPU: fp32, batch 1,4, DeiT-T/S
  python benchmarks/bench_models.py --device cpu --dtype bf16 --threads 2 --batch-sizes 8,64 \
      --models dinov2_small,dinov3_small,eva02_small --variants 2 --no-compile --out bench_out
Writes models.csv and models.png into --out.
"""
import argparse
import os
import sys
import time

import torch

from dcvit_engine.atomic import save_figure
from dcvit_engine.compress.structure import compressed_spec, default_candidates, plan_dcvit
from dcvit_engine.engine import build_engine, parse_dtype
from dcvit_engine.macs import block_macs, count_macs
from dcvit_engine.models import resolve_model
from dcvit_engine.ops import BACKENDS, BackendUnavailableError
from dcvit_engine.reference import ViTReference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import matmul_peak_tflops, time_interleaved, write_rows_csv  # noqa: E402

MODELS = {"deit_tiny": "deit_tiny_patch16_224", "deit_small": "deit_small_patch16_224",
          "deit_base": "deit_base_patch16_224",
          # the modern backbones (issue 19): registers at 518 px, RoPE + SwiGLU + LayerScale, EVA-02
          "dinov2_small": "vit_small_patch14_reg4_dinov2", "dinov3_small": "vit_small_patch16_dinov3",
          "eva02_small": "eva02_small_patch14_224"}
FIELDS = ["model", "variant", "blocks_compressed", "mlp_hidden", "gmacs", "macs_reduction", "runner",
          "batch_size", "images_per_s", "median_ms", "floor_ms", "of_floor", "speedup", "realized_speedup"]


def dcvit_variant(spec, num_blocks: int):
    """The DC-ViT structure with `num_blocks` attention-free blocks (see the module docstring)."""
    first = default_candidates(spec)[0]
    cost = block_macs(spec, first)
    teacher = count_macs(spec).total
    target = 1 - (num_blocks - 0.5) * cost.total / teacher
    plan = plan_dcvit(spec, target, num_blocks=num_blocks)
    return compressed_spec(spec, plan.candidates[:num_blocks], plan.hidden_width), plan.hidden_width


def engine_backends(device: torch.device, chosen=None) -> list[str]:
    # the Triton interpreter on the CPU is a testing tool, far too slow to time
    return [b for b in BACKENDS if not (device.type == "cpu" and b in ("cuda", "triton"))
            and not (device.type == "cuda" and b == "cpu") and (chosen is None or b in chosen)]


def bench_model(short: str, args, device, dtype, rows: list[dict], log):
    """Every runner of one model (timm eager, timm compiled, the engine per backend and variant)
    timed interleaved per batch size (timing.time_interleaved): their ratios compare runs made
    under the same load. Rows come out per runner, then variant, then batch."""
    teacher = resolve_model(model_name=MODELS[short])
    spec0 = teacher.spec
    images = {b: torch.randn(b, spec0.in_chans, *spec0.img_size, device=device, dtype=dtype)
              for b in args.batch_sizes}
    base_macs = count_macs(spec0).total
    full_hidden = spec0.blocks[0].mlp_hidden
    runners = {}  # (runner name, variant) -> (N, MLP hidden, spec, callable)

    # timm baselines (uncompressed only: timm has no attention-free block)
    import timm
    timm_model = timm.create_model(MODELS[short], pretrained=False).to(device=device, dtype=dtype).eval()
    runners["timm_eager", "full"] = (0, full_hidden, spec0, timm_model)
    if not args.no_compile:
        mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs, like the engine
        runners["timm_compile", "full"] = (0, full_hidden, spec0, torch.compile(timm_model, mode=mode))

    variants = [("full", 0, full_hidden, teacher)]
    for n in args.variants:
        spec, hidden = dcvit_variant(spec0, n)
        variants.append((f"N={n}", n, hidden, ViTReference(spec).eval()))
    for backend in engine_backends(device, args.backends):
        for variant, n, hidden, model in variants:
            engine = build_engine(model, backend=backend, dtype=dtype, device=device)
            try:
                with torch.no_grad():
                    engine(images[args.batch_sizes[0]])
            except BackendUnavailableError as err:
                log(f"skip engine backend {backend}: {str(err).splitlines()[0]}")
                break
            runners[f"engine_{backend}", variant] = (n, hidden, model.spec, engine)

    timings = {}
    for batch in args.batch_sizes:
        measured = time_interleaved({key: entry[3] for key, entry in runners.items()}, images[batch],
                                    warmup=args.warmup, repeats=args.repeats)
        for (runner, variant), timing in measured.items():
            timings[runner, variant, batch] = timing
            log(f"{short:10} {variant:6} {runner:14} batch {batch:4}: {timing.images_per_s:10.1f} images/s "
                f"({timing.median_ms:.2f} ms)")
        for _, _, _, runner in runners.values():
            if hasattr(runner, "clear_graphs"):
                runner.clear_graphs()  # one batch size's CUDA graphs at a time in GPU memory
    for (runner, variant), (n, hidden, spec, _) in runners.items():
        macs = count_macs(spec).total
        for batch in args.batch_sizes:
            timing = timings[runner, variant, batch]
            rows.append(dict(model=short, variant=variant, blocks_compressed=n, mlp_hidden=hidden,
                             gmacs=macs / 1e9, macs_reduction=base_macs / macs, runner=runner,
                             batch_size=batch, images_per_s=timing.images_per_s, median_ms=timing.median_ms))


def add_speedups(rows: list[dict], peak_tflops: float) -> None:
    base = {(r["model"], r["runner"], r["batch_size"]): r["images_per_s"]
            for r in rows if r["variant"] == "full"}
    for r in rows:
        full = base[(r["model"], r["runner"], r["batch_size"])]
        r["speedup"] = r["images_per_s"] / full
        r["realized_speedup"] = r["speedup"] / r["macs_reduction"]
        r["floor_ms"] = 2 * r["gmacs"] * 1e9 * r["batch_size"] / (peak_tflops * 1e12) * 1e3
        r["of_floor"] = r["floor_ms"] / r["median_ms"]


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch_size"] for r in rows})
    fig, axes = plt.subplots(len(batches), 2, figsize=(12, 4 * len(batches)), squeeze=False)
    for row, batch in enumerate(batches):
        left, right = axes[row]
        lines = sorted({(r["model"], r["runner"]) for r in rows if r["batch_size"] == batch})
        for model, runner in lines:
            pts = sorted((r["gmacs"], r["images_per_s"], r["realized_speedup"]) for r in rows
                         if r["batch_size"] == batch and r["model"] == model and r["runner"] == runner)
            style = "o-" if runner.startswith("engine") else "s"
            left.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{model} {runner}")
            if runner.startswith("engine"):
                right.plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=f"{model} {runner}")
        left.set(xlabel="GMACs / image", ylabel="images / s", title=f"batch {batch}: throughput",
                 yscale="log")
        right.axhline(1.0, color="gray", lw=0.8)
        right.set(xlabel="GMACs / image", ylabel="measured speedup / MACs reduction",
                  title=f"batch {batch}: realized speedup")
        left.legend(fontsize=7)
        right.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def format_table(rows: list[dict]) -> str:
    header = (f"{'model':10} {'variant':7} {'hidden':>6} {'GMACs':>6} {'MACs red.':>9} {'runner':14} "
              f"{'batch':>5} {'images/s':>10} {'ms':>9} {'floor ms':>9} {'of floor':>8} {'speedup':>7} "
              f"{'realized':>8}")
    lines = [header]
    for r in rows:
        lines.append(f"{r['model']:10} {r['variant']:7} {r['mlp_hidden']:>6} {r['gmacs']:6.3f} "
                     f"{r['macs_reduction']:9.3f} {r['runner']:14} {r['batch_size']:5} "
                     f"{r['images_per_s']:10.1f} {r['median_ms']:9.2f} {r['floor_ms']:9.3f} "
                     f"{r['of_floor']:8.3f} "
                     f"{r['speedup']:7.3f} "
                     f"{r['realized_speedup']:8.3f}")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default bf16 on CUDA, float32 on the CPU")
    parser.add_argument("--batch-sizes", default=None,
                        help="comma list (default 1,64,256 on CUDA, 1,4 on the CPU)")
    parser.add_argument("--models", default=None,
                        help=f"comma list of {sorted(MODELS)} (default all on CUDA, deit_tiny,deit_small "
                        "on the CPU)")
    parser.add_argument("--variants", default="1,2,3,4,5,6", help="comma list of N (attention-free blocks)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs (default 20 on CUDA, 5 on the CPU)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed runs (default 5 on CUDA, 1 on the CPU)")
    parser.add_argument("--no-compile", action="store_true", help="skip timm + torch.compile")
    parser.add_argument("--backends", default=None,
                        help=f"comma list of engine backends from {list(BACKENDS)} (default: every one this "
                        "device runs)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (on a shared machine 1 thread is the least noisy)")
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.dtype = parse_dtype(args.dtype or ("bf16" if gpu else "float32"))
    args.batch_sizes = [int(b) for b in (args.batch_sizes or ("1,64,256" if gpu else "1,4")).split(",")]
    default_models = "deit_tiny,deit_small,deit_base" if gpu else "deit_tiny,deit_small"
    args.models = (args.models or default_models).split(",")
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    args.variants = [int(n) for n in args.variants.split(",") if n]
    if args.backends is not None:
        args.backends = [b for b in args.backends.split(",") if b]
        unknown = [b for b in args.backends if b not in BACKENDS]
        if unknown:
            parser.error(f"unknown backend(s) {unknown}; choose from {list(BACKENDS)}")
    args.repeats = args.repeats or (20 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    what = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads")
    print(f"{what}, {args.dtype}, batch sizes {args.batch_sizes}", flush=True)
    start = time.perf_counter()
    rows: list[dict] = []
    for short in args.models:
        bench_model(short, args, device, args.dtype, rows, log=lambda line: print(line, flush=True))
    peak = matmul_peak_tflops(device, args.dtype)
    print(f"matmul peak (measured, {args.dtype}): {peak:.1f} TFLOP/s: the floor of each timing", flush=True)
    add_speedups(rows, peak)
    print("\n" + format_table(rows))
    write_rows_csv(rows, FIELDS, os.path.join(args.out, "models.csv"))
    plot(rows, os.path.join(args.out, "models.png"), f"{what}, {str(args.dtype).removeprefix('torch.')}")
    print(f"\nwrote {args.out}/models.csv and models.png ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
