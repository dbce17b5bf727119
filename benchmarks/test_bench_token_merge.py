"""pytest-benchmark CPU benchmarks of the token merging ops (run: pytest benchmarks/ --benchmark-enable)."""
import pytest
import torch

from dcvit_engine import ops
from dcvit_engine.kernels.token_merge import atme_merge_ref, tome_merge_ref


@pytest.fixture(scope="module")
def deit_small_tokens():
    """4 images of DeiT-S tokens (1 + 14x14, D=384), 64-wide keys, sizes after a merge."""
    torch.manual_seed(0)
    x = torch.randn(4, 197, 384)
    metric = torch.randn(4, 197, 64)
    size = torch.randint(1, 4, (4, 197, 1)).float()
    return x, metric, size


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_tome_merge_cpu(benchmark, deit_small_tokens, backend):
    x, metric, size = deit_small_tokens
    out, out_size = benchmark(lambda: ops.tome_merge(x, metric, 13, size, backend=backend))
    ref, ref_size = tome_merge_ref(x, metric, 13, size)
    torch.testing.assert_close((out, out_size), (ref, ref_size), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("axis", ["w", "h"])
def test_atme_merge_cpu(benchmark, deit_small_tokens, backend, axis):
    x, metric, size = deit_small_tokens
    out, out_size, _ = benchmark(lambda: ops.atme_merge(x, metric, (14, 14), axis, 1, size, backend=backend))
    ref, ref_size, _ = atme_merge_ref(x, metric, (14, 14), axis, 1, size)
    torch.testing.assert_close((out, out_size), (ref, ref_size), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_atme_unmerge_cpu(benchmark, deit_small_tokens, backend):
    x, metric, size = deit_small_tokens
    merged = atme_merge_ref(x, metric, (14, 14), "w", 1, size)[0]
    full = benchmark(lambda: ops.atme_unmerge(merged, (14, 14), "w", 1, backend=backend))
    assert full.shape == x.shape


def test_cpu_mode_reports_the_floor_next_to_each_timing(tmp_path, monkeypatch, capsys):
    """The script's CPU mode runs end to end; every row carries its floor (bytes / measured
    copy bandwidth) and frac_of_peak is floor / time. No timing is checked."""
    import csv
    import math
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    import bench_token_merge

    monkeypatch.setattr(sys, "argv", ["bench_token_merge.py", "--device", "cpu", "--batch", "1",
                                      "--grid", "4", "--models", "deit_s", "--out", str(tmp_path)])
    bench_token_merge.main()
    rows = list(csv.DictReader(open(tmp_path / "token_merge.csv")))
    assert {r["case"] for r in rows} == set(bench_token_merge.CASES)
    assert {r["impl"] for r in rows} == {"torch", "cpu"}
    for r in rows:
        floor, ms = float(r["floor_ms"]), float(r["median_ms"])
        # the CSV rounds to 4 decimals: a few percent at the CPU smoke sizes
        assert 0 < floor and math.isclose(float(r["frac_of_peak"]), floor / ms, rel_tol=0.05, abs_tol=2e-3)
    assert "floor" in capsys.readouterr().out
