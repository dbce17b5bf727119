"""The engine against what users deploy on a CPU: images/s of eager PyTorch, torch.compile,
onnxruntime, OpenVINO and the engine on the same weights, interleaved in one run per cell
(dcvit_engine.throughput.time_interleaved: every round calls every runner once, so all of them
see the same load), per model, dtype and batch size.

Models: DeiT-S and DeiT-B, and a DC-ViT student of each (bench_models.dcvit_variant: N blocks
without attention and their MLPs at one narrower width; --students N,...). Weights are random
(speed does not depend on them) and shared: the eager runner is timm's own module for the
uncompressed model and the plain-PyTorch reference module (dcvit_engine.reference, timm's
ops) for a student, which timm cannot build; torch.compile compiles that runner; the engine
is built from it; the peers run its ONNX export (dcvit_engine.peers: one fp32 file with a
dynamic batch, bf16 through OpenVINO's INFERENCE_PRECISION_HINT; onnxruntime has no bf16
CPU kernels and shows "-" there). Threads: --threads sets torch's, onnxruntime's intra-op
and OpenVINO's INFERENCE_NUM_THREADS alike.

A peer that is not installed or cannot load the export is a row with status "unavailable"
and the reason; the rest is measured. Every row names the runtime and its version.

  python benchmarks/bench_peers.py --threads 2 --out peers_out             # the full grid
  python benchmarks/bench_peers.py --smoke --out peers_out                 # tiny shapes (CI)
  python benchmarks/bench_peers.py --profile --models deit_small --dtypes bf16 --batch-sizes 8
Writes peers.csv and peers.png into --out; --profile prints where the time goes instead
(peer_profile.py).
"""
import argparse
import os
import platform
import sys
import tempfile
import time

import timm
import torch

from dcvit_engine.atomic import save_figure
from dcvit_engine.engine import build_engine, parse_dtype
from dcvit_engine.macs import count_macs
from dcvit_engine.peers import (
    DTYPE_NAMES,
    PEERS,
    PeerRunner,
    Unavailable,
    export_when_needed,
    open_peers,
    runtime_versions,
)
from dcvit_engine.reference import ViTReference, reference_from_timm
from dcvit_engine.throughput import time_interleaved

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_models import dcvit_variant  # noqa: E402
from timing import write_rows_csv  # noqa: E402

MODELS = {"deit_small": ("deit_small_patch16_224", {}), "deit_base": ("deit_base_patch16_224", {}),
          # CI's smoke shape: 4 blocks at 32 px, so a student with 1 or 2 attention-free blocks exists
          "tiny": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=4,
                                                  num_heads=3, num_classes=10))}
RUNNERS = ("eager", "compile") + PEERS + ("engine",)
FIELDS = ["model", "variant", "blocks_compressed", "mlp_hidden", "gmacs", "dtype", "batch_size", "threads",
          "runner", "runtime", "version", "status", "images_per_s", "median_ms", "note"]


def cpu_model() -> str:
    """lscpu's model name (the CSV's and RESULTS.md's machine)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
                        platform.processor())
    except OSError:
        return platform.processor() or platform.machine()


def model_variants(short: str, students: list[int]):
    """(variant label, attention-free blocks, MLP hidden width, eager module, reference module)
    per model: the uncompressed one first (timm's own module eager), then the students."""
    name, kwargs = MODELS[short]
    timm_model = timm.create_model(name, pretrained=False, **kwargs).eval()
    reference = reference_from_timm(timm_model)
    hidden = reference.spec.blocks[0].mlp_hidden
    out = [("full", 0, hidden, timm_model, reference)]
    for n in students:
        spec, width = dcvit_variant(reference.spec, n)
        student = ViTReference(spec).eval()
        out.append((f"N={n}", n, width, student, student))
    return out


def cell_runners(args, eager, reference, dtype, export) -> dict:
    """Every runner of one model in one dtype: callables, or Unavailable with the reason.
    export: export_when_needed's (file, reason)."""
    runners = {"eager": eager.to(dtype)}
    if "compile" in args.runners:
        runners["compile"] = torch.compile(runners["eager"])
    peers = [p for p in PEERS if p in args.runners]
    runners.update(open_peers(*export, dtype, torch.get_num_threads(), peers))
    runners["engine"] = build_engine(reference, backend=args.backend, dtype=dtype, device="cpu")
    return {k: v for k, v in runners.items() if k in args.runners}


def runtime_of(runner: str, versions: dict) -> tuple[str, str]:
    runtime = runner if runner in PEERS else "torch"
    return runtime, versions[runtime]


def bench(args, log) -> list[dict]:
    versions = runtime_versions()
    threads = torch.get_num_threads()
    rows = []
    for short in args.models:
        for variant, n, hidden, eager, reference in model_variants(short, args.students):
            gmacs = count_macs(reference.spec).total / 1e9
            with tempfile.TemporaryDirectory(prefix="dcvit-peers-") as folder:
                export = export_when_needed(reference, folder, [p for p in PEERS if p in args.runners])
                for dtype in args.dtypes:
                    runners = cell_runners(args, eager, reference, dtype, export)
                    live = {k: r for k, r in runners.items() if not isinstance(r, Unavailable)}
                    for batch in args.batch_sizes:
                        images = torch.randn(batch, reference.spec.in_chans, *reference.spec.img_size,
                                             dtype=dtype)
                        timings = time_interleaved(live, images, warmup=args.warmup, repeats=args.repeats)
                        for name, runner in runners.items():
                            runtime, version = runtime_of(name, versions)
                            row = dict(model=short, variant=variant, blocks_compressed=n, mlp_hidden=hidden,
                                       gmacs=gmacs, dtype=DTYPE_NAMES[dtype], batch_size=batch,
                                       threads=threads, runner=name, runtime=runtime, version=version)
                            if isinstance(runner, Unavailable):
                                row.update(status="unavailable", note=runner.reason)
                            else:
                                t = timings[name]
                                row.update(status="ok", images_per_s=t.images_per_s, median_ms=t.median_ms,
                                           note=runner.note if isinstance(runner, PeerRunner) else "")
                            rows.append(row)
                            log(f"{short:10} {variant:5} {DTYPE_NAMES[dtype]} batch {batch:3} {name:12} "
                                + (f"{row['images_per_s']:9.1f} images/s" if row["status"] == "ok"
                                   else f"unavailable: {row['note']}"))
    return rows


def format_table(rows: list[dict]) -> str:
    """The issue's table: one line per model, variant, dtype and batch; a column per runner
    (images/s, "-" where unavailable) and engine / best other runner."""
    runners = [r for r in RUNNERS if any(row["runner"] == r for row in rows)]
    cells: dict[tuple, dict[str, float | None]] = {}
    for row in rows:
        key = (row["model"], row["variant"], row["dtype"], row["batch_size"])
        cells.setdefault(key, {})[row["runner"]] = row.get("images_per_s") if row["status"] == "ok" else None
    lines = ["| model | variant | dtype | batch | " + " | ".join(runners) + " | engine / best other |",
             "|---" * (len(runners) + 5) + "|"]
    for (model, variant, dtype, batch), values in cells.items():
        others = [v for k, v in values.items() if k != "engine" and v]
        ratio = f"{values['engine'] / max(others):.2f}" if values.get("engine") and others else "-"
        lines.append(f"| {model} | {variant} | {dtype} | {batch} | "
                     + " | ".join(f"{values[r]:.1f}" if values.get(r) else "-" for r in runners)
                     + f" | {ratio} |")
    reasons = sorted({(row["runner"], row["dtype"], row["note"]) for row in rows if row["status"] != "ok"})
    lines += [f"- {runner} ({dtype}): unavailable: {note}" for runner, dtype, note in reasons]
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    """images/s against batch size, one panel per model variant and dtype, a line per runner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["variant"], r["dtype"]) for r in rows})
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.5 * nrows), squeeze=False)
    for ax, (model, variant, dtype) in zip(axes.flat, panels):
        for runner in RUNNERS:
            key = (model, variant, dtype, runner)
            pts = sorted((r["batch_size"], r["images_per_s"]) for r in rows if r["status"] == "ok" and
                         (r["model"], r["variant"], r["dtype"], r["runner"]) == key)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if runner == "engine" else "s--",
                        label=runner)
        ax.set(xscale="log", xlabel="batch", ylabel="images / s", title=f"{model} {variant} {dtype}")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help=f"comma list of {sorted(MODELS)} "
                        "(default deit_small,deit_base; --smoke: tiny)")
    parser.add_argument("--students", default=None, help="comma list of N: a DC-ViT student with N "
                        "attention-free blocks per model (default 3; --smoke: 1; empty: none)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    parser.add_argument("--batch-sizes", default=None, help="comma list (default 1,8,64; --smoke: 1,2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of every runner (torch, onnxruntime intra-op, OpenVINO)")
    parser.add_argument("--runners", default=",".join(RUNNERS), help=f"comma list of {list(RUNNERS)}")
    parser.add_argument("--backend", default="cpu", help="the engine's backend (default cpu)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each runner")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 1 round: CI's check that it runs")
    parser.add_argument("--profile", action="store_true",
                        help="print the engine's per-op time beside OpenVINO's per-layer counters and the "
                        "GEMM floor, for the first model, dtype and batch size (no timing table)")
    parser.add_argument("--out", default="peers_out")
    args = parser.parse_args(argv)
    args.models = (args.models or ("tiny" if args.smoke else "deit_small,deit_base")).split(",")
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    students = args.students if args.students is not None else ("1" if args.smoke else "3")
    args.students = [int(n) for n in students.split(",") if n]
    if any(n < 1 for n in args.students):
        parser.error("--students takes numbers of attention-free blocks >= 1")
    try:
        args.dtypes = [parse_dtype(d) for d in args.dtypes.split(",") if d]
    except ValueError as err:
        parser.error(str(err))
    if any(d not in DTYPE_NAMES for d in args.dtypes):
        parser.error("--dtypes takes fp32 and bf16")
    args.batch_sizes = [int(b) for b in (args.batch_sizes or ("1,2" if args.smoke else "1,8,64")).split(",")]
    if any(b < 1 for b in args.batch_sizes):
        parser.error("--batch-sizes must be >= 1")
    args.runners = [r for r in args.runners.split(",") if r]
    unknown = [r for r in args.runners if r not in RUNNERS]
    if unknown or "engine" not in args.runners:
        parser.error(f"--runners takes {list(RUNNERS)} and must include engine")
    if args.smoke:
        args.repeats, args.warmup = 1, 1
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    versions = runtime_versions()
    what = (f"{cpu_model()}, {torch.get_num_threads()} threads; "
            + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(what, flush=True)
    if args.profile:
        from peer_profile import profile_cell
        short = args.models[0]
        variant = model_variants(short, args.students[:1])[-1]
        profile_cell(variant[4], args.dtypes[0], args.batch_sizes[0], backend=args.backend,
                     label=f"{short} {variant[0]}")
        return 0
    start = time.perf_counter()
    rows = bench(args, log=lambda line: print(line, flush=True))
    print("\n" + format_table(rows))
    os.makedirs(args.out, exist_ok=True)
    write_rows_csv(rows, FIELDS, os.path.join(args.out, "peers.csv"))
    plot(rows, os.path.join(args.out, "peers.png"), what)
    print(f"\nwrote {args.out}/peers.csv and peers.png ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
