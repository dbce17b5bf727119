"""pytest-benchmark CPU benchmarks of the attention block (run: pytest benchmarks/ --benchmark-enable)."""
import pytest
import torch

from dcvit_engine import ops
from dcvit_engine.kernels.attention import attention_block_ref

# DeiT-S widths (D=384, 6 heads of 64): dense, and ragged as UVC leaves them.
WIDTHS = {"dense": ([64] * 6, [64] * 6), "ragged": ([64, 17, 40, 25, 64, 17], [64, 5, 33, 26, 64, 5])}


def deit_small_block(qk_dims, v_dims, key_bias):
    batch, tokens, dim = 4, 197, 384
    rows = 2 * sum(qk_dims) + sum(v_dims)
    x = torch.randn(batch, tokens, dim)
    w = [torch.ones(dim), torch.zeros(dim), torch.randn(rows, dim) / dim**0.5, torch.zeros(rows),
         torch.randn(dim, sum(v_dims)) / sum(v_dims)**0.5, torch.zeros(dim)]
    bias = torch.randint(1, 4, (batch, tokens)).float().log() if key_bias else None
    return x, w, torch.full((dim,), 0.1), bias


@pytest.mark.parametrize("key_bias", [False, True])
@pytest.mark.parametrize("widths", list(WIDTHS))
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_attention_block_cpu(benchmark, backend, widths, key_bias):
    qk_dims, v_dims = WIDTHS[widths]
    x, w, gamma, bias = deit_small_block(qk_dims, v_dims, key_bias)
    out = benchmark(lambda: ops.attention_block(x, *w, qk_dims, v_dims, 0.125, gamma=gamma,
                                                key_bias=bias, backend=backend))
    torch.testing.assert_close(out, attention_block_ref(x, *w, qk_dims, v_dims, 0.125, gamma=gamma,
                                                        key_bias=bias), rtol=1e-4, atol=1e-4)


def test_ragged_cpu_benchmark_reports_every_case():
    import bench_attention_ragged_cpu as bench

    lines = []
    results = bench.run(batch=1, tokens=9, dtype=torch.float32, repeats=1, log=lines.append)
    assert set(results) == {"dense", "ragged", "ragged_engine"} and len(lines) == 3
    assert results["ragged"][1] == results["ragged_engine"][1] < results["dense"][1]  # real MACs
