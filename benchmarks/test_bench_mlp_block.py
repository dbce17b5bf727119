"""pytest-benchmark CPU benchmarks of the MLP-only block (run: pytest benchmarks/ --benchmark-enable)."""
import pytest
import torch

from dcvit_engine import ops
from dcvit_engine.kernels.mlp_block import mlp_block_ref


@pytest.fixture(scope="module")
def deit_small_block():
    rows, dim, hidden = 4 * 197, 384, 1536
    x = torch.randn(rows, dim)
    w = [torch.ones(dim), torch.zeros(dim), torch.randn(hidden, dim) / dim**0.5, torch.zeros(hidden),
         torch.randn(dim, hidden) / hidden**0.5, torch.zeros(dim)]
    return x, w, torch.full((dim,), 0.1)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_mlp_block_cpu(benchmark, deit_small_block, backend):
    x, w, gamma = deit_small_block
    out = benchmark(lambda: ops.mlp_block(x, *w, gamma=gamma, backend=backend))
    torch.testing.assert_close(out, mlp_block_ref(x, *w, gamma=gamma), rtol=1e-4, atol=1e-4)
