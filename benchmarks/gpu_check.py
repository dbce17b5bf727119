"""The GPU check in one command that fits a lent GPU machine's 10-minute call by construction.

Steps, in order, each under its own timeout and only while the budget (default 480 s) has time
left: machine facts, build (sm_90 only, all cores), `dcvit doctor`, the GPU tests (`-m gpu`,
no -x), optionally a short CUDA subset under compute-sanitizer memcheck (--sanitize), the three
kernel benchmarks at DeiT-B shapes in bf16 (MLP block; attention dense/half/ragged; token
merge), then DeiT-B end to end at batch 256 bf16 with one DC-ViT variant: timm eager and the
engine (CUDA graphs), then timm + torch.compile. A step that fails or times out is recorded as
such and the next one runs. Whatever happens, $OUT ends with exactly two files: gpu_check.tar.gz
(every log and CSV) and summary.txt, whose last lines are the table target / measured / met.

--dry-run runs the same steps in the same order on the CPU with tiny shapes (no build, no
nvidia-smi): the control flow, tested in CI; its numbers are not measurements.

  bash benchmarks/gpu_check.sh                      # OUT defaults to ./gpu_out
  python benchmarks/gpu_check.py --out DIR [--budget 480] [--sanitize] [--dry-run]
"""
import argparse
import csv
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKING_S = 20  # kept back from the budget for the tarball and the summary


@dataclasses.dataclass
class Step:
    name: str
    cmd: list
    timeout: float  # its own limit; the budget left may cut it shorter
    min_s: float = 10.0  # not started with less budget left than this
    env: dict = dataclasses.field(default_factory=dict)
    ok_codes: tuple = (0,)
    status: str = "not run"
    seconds: float = 0.0
    log: str = ""


def run_steps(steps, budget_s, log_dir, clock=time.monotonic):
    """Runs the steps in order within budget_s seconds; records each one's status."""
    start = clock()
    os.makedirs(log_dir, exist_ok=True)
    for index, step in enumerate(steps):
        left = budget_s - (clock() - start)
        step.log = os.path.join(log_dir, f"{index:02d}_{step.name}.log")
        if left < step.min_s:
            step.status = f"skipped: {left:.0f} s of budget left, needs {step.min_s:.0f}"
            continue
        limit = min(step.timeout, left)
        began = clock()
        with open(step.log, "w") as log:
            log.write(f"$ {' '.join(step.cmd)}\n")
            log.flush()
            try:
                proc = subprocess.Popen(step.cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **step.env}, start_new_session=True)
            except OSError as err:
                step.status = f"failed to start: {err}"
                continue
            try:
                rc = proc.wait(timeout=limit)
                step.status = "ok" if rc in step.ok_codes else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the step's own process group only
                proc.wait()
                step.status = f"timed out after {limit:.0f} s"
        step.seconds = clock() - began
    return steps


def plan(args, work):
    """The steps; --dry-run swaps each for its CPU, tiny-shape twin, same names and order."""
    py, dry = sys.executable, args.dry_run
    bench = os.path.join(work, "bench")
    cpu = ["--device", "cpu"] if dry else ["--dtype", "bf16"]
    gpu_tests = ["tests/test_mlp_block.py"] if dry else ["tests"]
    sanitize_subset = ["tests/test_mlp_block.py", "tests/test_attention.py", "tests/test_token_merge.py",
                       "-m", "gpu", "-k", "writes_every_output_element or out_variants",
                       "-q", "-p", "no:cacheprovider"]
    model = (["--models", "deit_tiny", "--batch-sizes", "1", "--repeats", "1", "--warmup", "0",
              "--no-compile"]
             if dry else ["--models", "deit_base", "--batch-sizes", "256"])
    steps = [
        Step("machine", [py, "-c", "import platform, torch; print(platform.platform(), torch.__version__)"]
             if dry else ["nvidia-smi"], 15, min_s=5),
        Step("build", [py, "-c", "import dcvit_engine._C"] if dry else
             [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."], 150,
             env={"TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": str(os.cpu_count() or 4)}),
        Step("doctor", [py, "-m", "dcvit_engine.cli", "doctor"], 45),
        # GPU tests only, all of them (no -x); exit 5 = none selected, as on a machine without them
        Step("gpu_tests", [py, "-m", "pytest", *gpu_tests, "-m", "gpu", "-q", "-p", "no:cacheprovider"], 120,
             ok_codes=(0, 5)),
    ]
    if args.sanitize:
        tool = [] if dry else ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1"]
        steps.append(Step("sanitize", [*tool, py, "-m", "pytest", *sanitize_subset], 120, ok_codes=(0, 5)))
    steps += [
        Step("bench_mlp_block", [py, "benchmarks/bench_mlp_block.py", *cpu, "--out", bench]
             + (["--rows", "64", "--dim", "64", "--hidden", "256"] if dry else []), 60, min_s=20),
        Step("bench_attention", [py, "benchmarks/bench_attention.py", *cpu, "--out", bench]
             + (["--models", "deit_s", "--batch", "1", "--tokens", "17", "--cases", "dense"] if dry
                else ["--models", "deit_b"]), 60, min_s=20),
        Step("bench_token_merge", [py, "benchmarks/bench_token_merge.py", *cpu, "--out", bench]
             + (["--models", "deit_s", "--batch", "1", "--cases", "tome_r13"] if dry
                else ["--models", "deit_b"]), 60, min_s=20),
        # engine (CUDA graphs, every GPU backend) and timm eager; then timm + torch.compile alone
        Step("bench_models", [py, "benchmarks/bench_models.py", *cpu, *model, "--variants", "4",
                              "--no-compile", "--out", os.path.join(bench, "models")]
             + (["--backends", "torch"] if dry else []), 120, min_s=40),
        Step("bench_models_compile", [py, "benchmarks/bench_models.py", *cpu, *model, "--variants", "",
                                      "--backends", "", "--out", os.path.join(bench, "models_compile")],
             120, min_s=60),
    ]
    return steps


# ---- targets: what the summary's last lines judge ---------------------------------------

def _rows(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def _best(rows, column, keep):
    values = [float(r[column]) for r in rows if keep(r) and r.get(column) not in (None, "", "nan")]
    return max(values) if values else None


def targets(bench):
    """(target, threshold, measured or None) from the benchmark CSVs (issue 10's targets)."""
    mlp = _rows(os.path.join(bench, "mlp_block.csv"))
    attn = _rows(os.path.join(bench, "attention.csv"))
    merge = _rows(os.path.join(bench, "token_merge.csv"))
    models = _rows(os.path.join(bench, "models", "models.csv"))
    compiled = _rows(os.path.join(bench, "models_compile", "models.csv"))
    fused = lambda r: r["impl"] not in ("torch_unfused", "torch", "sdpa")  # noqa: E731
    widest = max((int(r["hidden"]) for r in mlp), default=None)
    mlp_4d = [r for r in mlp if widest is not None and int(r["hidden"]) == widest]
    full = lambda r: r["variant"] == "full"  # noqa: E731
    engine = lambda r: r["runner"].startswith("engine")  # noqa: E731
    timm_compile = _best(compiled, "images_per_s", lambda r: r["runner"] == "timm_compile" and full(r))
    timm_eager = _best(models, "images_per_s", lambda r: r["runner"] == "timm_eager" and full(r))
    engine_full = _best(models, "images_per_s", lambda r: engine(r) and full(r))
    return [
        ("MLP block (H=4D) vs unfused torch, x", 1.2, _best(mlp_4d, "speedup_vs_unfused", fused)),
        ("MLP block (H=4D) fraction of matmul peak", 0.65, _best(mlp_4d, "frac_of_peak", fused)),
        ("attention core (dense) vs SDPA, x", 1.0,
         _best(attn, "speedup_vs_torch",
               lambda r: fused(r) and r["case"] == "dense" and r["scope"] == "core")),
        ("ToMe merge fraction of copy bandwidth", 0.6,
         _best(merge, "frac_of_peak", lambda r: fused(r) and r["case"].startswith("tome"))),
        ("engine (CUDA graphs) vs timm eager, x", 1.15,
         engine_full / timm_eager if engine_full and timm_eager else None),
        ("engine (CUDA graphs) vs timm + compile, x", 1.0,
         engine_full / timm_compile if engine_full and timm_compile else None),
        ("DC-ViT variant realized speedup", 0.9,
         _best(models, "realized_speedup", lambda r: engine(r) and not full(r))),
    ]


def summary_text(args, steps, bench, started):
    kind = ("DRY RUN on the CPU with tiny shapes: control flow only, no measurement" if args.dry_run
            else "GPU run")
    lines = [f"gpu_check: {kind}", f"started {started}, budget {args.budget:.0f} s, sanitize {args.sanitize}",
             "", f"{'#':>2} {'step':22} {'seconds':>7}  status"]
    for i, s in enumerate(steps):
        lines.append(f"{i:>2} {s.name:22} {s.seconds:7.1f}  {s.status}")
    for s in steps:
        if s.status.startswith(("failed", "timed out")) and os.path.exists(s.log):
            tail = open(s.log, errors="replace").read().splitlines()[-8:]
            lines += ["", f"-- last lines of {s.name}:"] + ["   " + t[:200] for t in tail]
    lines += ["", f"{'target':44} {'needed':>7} {'measured':>9}  met"]
    for name, need, got in targets(bench):
        shown = f"{got:9.3f}" if got is not None else f"{'-':>9}"
        met = "n/a (not measured)" if got is None else ("yes" if got >= need else "no")
        lines.append(f"{name:44} {need:>7.2f} {shown}  {met}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all steps and packing")
    parser.add_argument("--sanitize", action="store_true",
                        help="also a short CUDA test subset under memcheck")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny shapes")
    args = parser.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    work = tempfile.mkdtemp(prefix="gpu_check_")
    try:
        steps = run_steps(plan(args, work), args.budget - PACKING_S, os.path.join(work, "logs"))
        text = summary_text(args, steps, os.path.join(work, "bench"), started)
        with open(os.path.join(work, "summary.txt"), "w") as f:
            f.write(text)
        os.makedirs(args.out, exist_ok=True)
        with tarfile.open(os.path.join(args.out, "gpu_check.tar.gz"), "w:gz") as tar:
            tar.add(work, arcname="gpu_check")
        with open(os.path.join(args.out, "summary.txt"), "w") as f:
            f.write(text)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
