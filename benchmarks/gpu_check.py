"""The GPU check in one command, ordered by value and budgeted by construction for a lent GPU
machine's 10-minute call: the step timeouts add up to at most the budget (tests assert it), so
a slow step costs only its own time and the headline is measured in the first minutes.

Steps (STEP_TIMEOUTS), each under its own timeout, each writing its CSV rows as it measures:
  environment    imports, ninja, nvcc, the GPU's name
  build          the extension for sm_90 only, all cores
  smoke          one eager call of each Triton op at DeiT-B bf16 against the reference, with
                 the first call's compile + autotune wall time (gpu_steps.py smoke)
  headline       DeiT-B batch 256 bf16: engine (default backends, CUDA graphs) vs timm eager,
                 interleaved, its max logit error, a DC-ViT variant's realized speedup
  gemms          each GEMM against torch.mm with the autotuner's pick
  backends       MLP block and attention block triton vs cuda, flash core vs SDPA
  merges         ToMe / ATME per backend from CUDA graphs, GB/s
  input_pipeline benchmarks/bench_input_pipeline.py, if this tree has it ("not present" else)
  gpu_tests      pytest -m gpu, verbose; SIGINT first at its timeout so pytest prints its summary
  compile        timm + torch.compile vs timm eager vs the engine, interleaved
  sanitize       (--sanitize) the merges' and ops' out-of-bounds tests under compute-sanitizer
A step that fails or times out is named in the summary with its last log lines, and the next
one runs. The summary (always written) judges each target on what the engine runs by default,
prints the best backend beside it, and says for each unmeasured target which step left it so.
$OUT ends with two files: gpu_check.tar.gz (every log and CSV) and summary.txt.

--dry-run runs the same steps in the same order on the CPU with tiny shapes (no build, no
GPU), every timeout and the budget times DRY_RUN_SLOWDOWN: the control flow, tested in CI;
its numbers are not measurements.

  bash benchmarks/gpu_check.sh                      # OUT defaults to ./gpu_out
  python benchmarks/gpu_check.py --out DIR [--budget 540] [--sanitize] [--dry-run]
"""
import argparse
import csv
import dataclasses
import glob
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 540.0   # fits `run`'s 600 s per command with python start-up and packing to spare
PACKING_S = 15.0   # kept back from the budget for the summary and the tarball
INTERRUPT_GRACE_S = 10.0  # gpu_tests: SIGINT this long before its timeout, then SIGKILL
# seconds per step, in running order; --sanitize takes its share from gpu_tests
STEP_TIMEOUTS = {"environment": 15, "build": 120, "smoke": 50, "headline": 100, "gemms": 35,
                 "backends": 45, "merges": 25, "input_pipeline": 45, "gpu_tests": 60, "compile": 30}
SANITIZE_S = 30
# --dry-run: the CPU (Triton interpreted, shared CI machines) is slower than the GPU at even the
# tiny shapes; every timeout and the budget are scaled by this, the order stays the same
DRY_RUN_SLOWDOWN = 3
INPUT_PIPELINE = "benchmarks/bench_input_pipeline.py"
# 2048 synthetic ImageNet-sized JPEGs: fewer and DataLoader start-up dominates infer vs engine
INPUT_PIPELINE_GPU = ["--device", "cuda", "--model", "deit_base_patch16_224", "--batch-size", "256",
                      "--dtype", "bf16", "--images", "2048", "--core-images", "32", "--workers", "8"]
INPUT_PIPELINE_DRY = ["--device", "cpu", "--model", "deit_tiny_patch16_224", "--model-kwargs",
                      '{"img_size": 32, "depth": 2}', "--batch-size", "4", "--images", "8",
                      "--core-images", "4", "--workers", "0"]
# GPU test files whose failures matter most run first: the production paths, then the ops
GPU_TEST_ORDER = ["tests/test_engine_gpu_defaults.py", "tests/test_engine.py", "tests/test_token_merge.py",
                  "tests/test_mlp_block.py", "tests/test_attention.py"]
SANITIZE_TESTS = ["tests/test_token_merge.py", "tests/test_mlp_block.py", "tests/test_attention.py",
                  "-k", "nan or writes_every_output_element or out_variants"]


@dataclasses.dataclass
class Step:
    name: str
    cmd: list
    timeout: float  # its own limit; the budget left may cut it shorter
    min_s: float = 5.0  # not started with less budget left than this
    env: dict = dataclasses.field(default_factory=dict)
    ok_codes: tuple = (0,)
    requires: str = ""  # a file the step runs; absent -> "not present", not a failure
    interrupt_grace: float = 0.0  # > 0: SIGINT this long before the timeout, then SIGKILL
    status: str = "not run"
    seconds: float = 0.0
    log: str = ""


def _stop(proc, step, limit):
    """Ends a step's process group at its limit: SIGINT first when the step asks for a grace
    (pytest then prints its summary), SIGKILL for whatever is left."""
    if step.interrupt_grace > 0:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=step.interrupt_grace)
            return f"timed out after {limit:.0f} s (interrupted)"
        except subprocess.TimeoutExpired:
            pass
    os.killpg(proc.pid, signal.SIGKILL)  # the step's own process group only
    proc.wait()
    return f"timed out after {limit:.0f} s"


def run_steps(steps, budget_s, log_dir, clock=time.monotonic):
    """Runs the steps in order within budget_s seconds; records each one's status."""
    start = clock()
    os.makedirs(log_dir, exist_ok=True)
    for index, step in enumerate(steps):
        left = budget_s - (clock() - start)
        step.log = os.path.join(log_dir, f"{index:02d}_{step.name}.log")
        if step.requires and not os.path.exists(os.path.join(ROOT, step.requires)):
            step.status = f"not present: {step.requires} is not in this tree"
            continue
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
                rc = proc.wait(timeout=max(limit - step.interrupt_grace, 0.1))
                step.status = "ok" if rc in step.ok_codes else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                step.status = _stop(proc, step, limit)
        step.seconds = clock() - began
    return steps


def step_timeouts(sanitize, dry_run=False):
    timeouts = dict(STEP_TIMEOUTS)
    if sanitize:
        timeouts["gpu_tests"] -= SANITIZE_S
        timeouts["sanitize"] = SANITIZE_S
    scale = DRY_RUN_SLOWDOWN if dry_run else 1
    return {name: seconds * scale for name, seconds in timeouts.items()}


def budget(args):
    return args.budget * (DRY_RUN_SLOWDOWN if args.dry_run else 1)


def plan(args, work):
    """The steps in running order; --dry-run swaps each for its CPU, tiny-shape twin (same
    names, same order, same timeouts)."""
    py, dry = sys.executable, args.dry_run
    bench = os.path.join(work, "bench")
    timeouts = step_timeouts(args.sanitize, dry)
    interp = {"TRITON_INTERPRET": "1"} if dry else {}

    def gpu_step(name):
        return [py, "benchmarks/gpu_steps.py", name, "--out", bench] + (["--dry-run"] if dry else [])

    if dry:
        environment = [py, "-c", "import platform, torch, triton, timm; "
                       "print(platform.platform(), torch.__version__, triton.__version__, timm.__version__)"]
        build = [py, "-c", "import dcvit_engine._C"]
    else:
        environment = ["bash", "-c", f"'{py}' -c 'import torch, triton, timm; print(torch.__version__, "
                       "triton.__version__, timm.__version__, torch.cuda.get_device_name())'"
                       " && (ninja --version || echo 'ninja: missing') && (nvcc --version | tail -n 2"
                       " || echo 'nvcc: missing') && nvidia-smi -L"]
        build = [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
    tests = GPU_TEST_ORDER + sorted(set(glob.glob(os.path.join(ROOT, "tests", "test_*.py")))
                                    - {os.path.join(ROOT, t) for t in GPU_TEST_ORDER})
    tests = ["tests/test_token_merge.py"] if dry else [os.path.relpath(t, ROOT) for t in tests]
    steps = [
        Step("environment", environment, timeouts["environment"]),
        Step("build", build, timeouts["build"],
             env={"TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": str(os.cpu_count() or 4)}),
        Step("smoke", gpu_step("smoke"), timeouts["smoke"], env=interp),
        Step("headline", gpu_step("headline"), timeouts["headline"], min_s=30),
        Step("gemms", gpu_step("gemms"), timeouts["gemms"], env=interp),
        Step("backends", gpu_step("backends"), timeouts["backends"]),
        Step("merges", gpu_step("merges"), timeouts["merges"]),
        Step("input_pipeline", [py, INPUT_PIPELINE, "--out", os.path.join(bench, "input_pipeline"),
                                *(INPUT_PIPELINE_DRY if dry else INPUT_PIPELINE_GPU)],
             timeouts["input_pipeline"], requires=INPUT_PIPELINE),
        # exit 5 = no test selected, as on a machine without GPU tests
        Step("gpu_tests", [py, "-m", "pytest", *tests, "-m", "gpu", "-v", "-rfE", "-p", "no:cacheprovider"],
             timeouts["gpu_tests"], ok_codes=(0, 5), interrupt_grace=INTERRUPT_GRACE_S),
        Step("compile", gpu_step("compile"), timeouts["compile"], min_s=20),
    ]
    if args.sanitize:
        tool = [] if dry else ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1"]
        steps.append(Step("sanitize", [*tool, py, "-m", "pytest", *SANITIZE_TESTS, "-m", "gpu", "-v",
                                       "-p", "no:cacheprovider"], timeouts["sanitize"], ok_codes=(0, 5),
                          interrupt_grace=INTERRUPT_GRACE_S))
    return steps


# ---- targets: judged on the engine's default, best of the backends beside ---------------

def _rows(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def _value(row, column):
    try:
        return float(row[column])
    except (KeyError, TypeError, ValueError):
        return None


def _default_and_best(rows, column):
    """(value of the default implementation's row, (best value, its impl)) among rows."""
    default = next((_value(r, column) for r in rows if r.get("default") == "1"), None)
    scored = [(_value(r, column), r.get("impl", "")) for r in rows if _value(r, column) is not None]
    return default, max(scored, default=None)


def _ratio(rows, kind, numerator, denominator):
    values = {r["runner"]: _value(r, "value") for r in rows if r.get("kind") == kind}
    top, bottom = values.get(numerator), values.get(denominator)
    return top / bottom if top and bottom else None


def targets(bench):
    """[(target, needed, default value or None, (best, impl) or None, step that measures it)]."""
    backends = _rows(os.path.join(bench, "backends.csv"))
    headline = _rows(os.path.join(bench, "headline.csv"))
    compiled = _rows(os.path.join(bench, "compile.csv"))
    merges = _rows(os.path.join(bench, "merges.csv"))
    mlp = [r for r in backends if r.get("op") == "mlp_block"]
    widest = max((int(r["case"].removeprefix("hidden")) for r in mlp), default=None)
    mlp_4d = [r for r in mlp if r["case"] == f"hidden{widest}" and r["impl"] != "torch_unfused"]
    core = [r for r in backends if r.get("op") == "attention_core" and r.get("case") == "dense"]
    tome = [r for r in merges if r.get("case") == "tome_r13" and r.get("impl") != "torch"]
    realized = next((_value(r, "value") for r in headline if r.get("kind") == "realized_speedup"), None)
    return [
        ("MLP block (H=4D) vs unfused torch, x", 1.2, *_default_and_best(mlp_4d, "speedup_vs_torch"),
         "backends"),
        ("MLP block (H=4D) fraction of matmul peak", 0.65, *_default_and_best(mlp_4d, "frac_of_peak"),
         "backends"),
        ("attention core (dense) vs SDPA, x", 1.0, *_default_and_best(core, "speedup_vs_torch"), "backends"),
        ("ToMe merge fraction of copy bandwidth", 0.6, *_default_and_best(tome, "frac_of_peak"), "merges"),
        ("engine (CUDA graphs) vs timm eager, x", 1.15,
         _ratio(headline, "images_per_s", "engine", "timm_eager"), None, "headline"),
        ("engine (CUDA graphs) vs timm + compile, x", 1.0,
         _ratio(compiled, "images_per_s", "engine", "timm_compile"), None, "compile"),
        ("DC-ViT variant realized speedup", 0.9, realized, None, "headline"),
    ]


def _tail(path, lines=8):
    if not path or not os.path.exists(path):
        return []
    with open(path, errors="replace") as f:
        return f.read().splitlines()[-lines:]


def summary_text(args, steps, bench, started):
    kind = ("DRY RUN on the CPU with tiny shapes: control flow only, no measurement" if args.dry_run
            else "GPU run")
    lines = [f"gpu_check: {kind}",
             f"started {started}, budget {budget(args):.0f} s, sanitize {args.sanitize}",
             "", f"{'#':>2} {'step':16} {'timeout':>7} {'seconds':>7}  status"]
    for i, s in enumerate(steps):
        lines.append(f"{i:>2} {s.name:16} {s.timeout:7.0f} {s.seconds:7.1f}  {s.status}")
    for s in steps:
        if s.status.startswith(("failed", "timed out")):
            lines += ["", f"-- last lines of {s.name} ({s.status}):"]
            lines += ["   " + t[:200] for t in _tail(s.log)]
    errors = [r for r in _rows(os.path.join(bench, "headline.csv")) if r.get("kind") == "logit_error"]
    if errors:
        lines += ["", "max |logit - fp32 timm| at batch " + errors[0]["batch_size"] + ": "
                  + ", ".join(f"{r['runner']} {r['value']} (rel {r['rel_err']})" for r in errors)]
    status = {s.name: s.status for s in steps}
    table = targets(bench)
    lines += ["", f"{'target (judged on the default backend)':44} {'needed':>7} {'default':>9} "
              f"{'best (backend)':>22}  met"]
    for name, need, got, best, step in table:
        shown = f"{got:9.3f}" if got is not None else f"{'-':>9}"
        beside = f"{best[0]:.3f} ({best[1]})" if best else "-"
        if got is None:
            why = status.get(step, "not in this run")
            met = f"n/a (not measured: step {step} {'ok but wrote no row' if why == 'ok' else why})"
        else:
            met = "yes" if got >= need else "no"
        lines.append(f"{name:44} {need:>7.2f} {shown} {beside:>22}  {met}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all steps and packing")
    parser.add_argument("--sanitize", action="store_true",
                        help="also the out-of-bounds test subset under compute-sanitizer memcheck")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny shapes")
    args = parser.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    work = tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(args.out, exist_ok=True)
    steps, text = [], ""
    try:
        steps = plan(args, work)
        # the timeouts fit the budget by construction; a shorter --budget cuts the last steps
        run_steps(steps, budget(args) - PACKING_S, os.path.join(work, "logs"))
    finally:
        # the summary is written whatever happened above, an interrupt of this script included
        try:
            text = summary_text(args, steps, os.path.join(work, "bench"), started)
        except Exception:  # noqa: BLE001 - a broken CSV must not cost the run its summary
            text = f"gpu_check: summary failed\n{traceback.format_exc()}"
        with open(os.path.join(work, "summary.txt"), "w") as f:
            f.write(text)
        with tarfile.open(os.path.join(args.out, "gpu_check.tar.gz"), "w:gz") as tar:
            tar.add(work, arcname="gpu_check")
        with open(os.path.join(args.out, "summary.txt"), "w") as f:
            f.write(text)
        shutil.rmtree(work, ignore_errors=True)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
