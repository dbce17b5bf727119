"""benchmarks/gpu_check.py: steps under their timeouts and the budget, and a --dry-run of the
whole GPU check on the CPU (same steps, same order, at most 8 files, the targets table last)."""
import importlib.util
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def test_a_step_past_its_timeout_is_killed_and_the_next_runs_until_the_budget_is_spent(tmp_path):
    py = sys.executable
    steps = [
        gpu_check.Step("sleeps", [py, "-c", "import time; time.sleep(60)"], timeout=1, min_s=0),
        gpu_check.Step("fails", [py, "-c", "raise SystemExit(3)"], timeout=30, min_s=0),
        gpu_check.Step("passes", [py, "-c", "print('hello')"], timeout=30, min_s=0),
        gpu_check.Step("too_big", [py, "-c", "print('never')"], timeout=30, min_s=1000),
    ]
    start = time.monotonic()
    gpu_check.run_steps(steps, budget_s=120, log_dir=str(tmp_path))
    assert time.monotonic() - start < 60
    assert steps[0].status.startswith("timed out") and steps[0].seconds < 20
    assert [s.status for s in steps[1:]] == ["failed (exit 3)", "ok", steps[3].status]
    assert steps[3].status.startswith("skipped")
    assert "hello" in open(steps[2].log).read()


def test_the_budget_caps_every_step(tmp_path):
    ticks = iter([0, 0, 0, 100, 100, 100, 100])  # the first step "takes" 100 s of a 105 s budget
    steps = [gpu_check.Step("first", [sys.executable, "-c", "pass"], timeout=30, min_s=0),
             gpu_check.Step("second", [sys.executable, "-c", "pass"], timeout=30, min_s=10)]
    gpu_check.run_steps(steps, budget_s=105, log_dir=str(tmp_path), clock=lambda: next(ticks))
    assert steps[0].status == "ok" and steps[1].status.startswith("skipped: 5 s")


def test_dry_run_runs_every_step_in_order_and_leaves_two_files(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--sanitize", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["gpu_check.tar.gz", "summary.txt"]
    summary = (out / "summary.txt").read_text().splitlines()
    names = [line.split()[1] for line in summary if line[:2].strip().isdigit()]
    assert names == ["machine", "build", "doctor", "gpu_tests", "sanitize", "bench_mlp_block",
                     "bench_attention", "bench_token_merge", "bench_models", "bench_models_compile"]
    statuses = {line.split()[1]: line.split(None, 3)[3] for line in summary if line[:2].strip().isdigit()}
    not_ok = {name: status for name, status in statuses.items() if status != "ok"}
    assert not not_ok, "\n".join(summary)
    table = summary[-8:]
    assert table[0].split()[:1] == ["target"] and len(table) == 8
    assert all(line.rstrip().endswith(("yes", "no", "n/a (not measured)")) for line in table[1:])
