"""The cpu backend's own LayerNorm (csrc/cpu_layer_norm.cpp, inside attention_block and
mlp_block on CPUs with AVX512-BF16; ATen's elsewhere), and ATen's pinned by
DCVIT_CPU_LAYER_NORM=aten, against the float64 reference, per dtype: widths below, at and
past the kernel's 16-lane steps, rows offset far from zero (the mean term), one row and
enough rows to split over threads."""
import pytest
import torch

from dcvit_engine import ops
from dcvit_engine.kernels.mlp_block import mlp_block_ref
from numerics import assert_close_to_reference
from test_attention import ALL_ON, check_backend
from test_mlp_block import make_inputs

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True, params=["own", "aten"])
def norm(request, monkeypatch):
    """Every test once per LayerNorm: the environment variable is read on each call."""
    monkeypatch.setenv("DCVIT_CPU_LAYER_NORM", request.param)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,tokens,dim", [(1, 1, 1), (1, 3, 7), (2, 5, 16), (1, 9, 33), (3, 700, 100)])
def test_mlp_block_norm(batch, tokens, dim, dtype):
    torch.manual_seed(dim * 7 + tokens)
    x64, w64, g64 = make_inputs(batch, tokens, dim, 24, True, mean=20.0)
    cast = lambda t: t.to(dtype)  # noqa: E731
    x, w, g = cast(x64), [cast(t) for t in w64], cast(g64)
    out = ops.mlp_block(x, *w, gamma=g, backend="cpu")
    assert_close_to_reference(out, mlp_block_ref(x64, *w64, gamma=g64), mlp_block_ref(x, *w, gamma=g),
                              what=f"cpu {dtype} D={dim} rows={batch * tokens}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,dim,heads", [(3, 18, 2), (41, 40, 4), (600, 48, 3)])
def test_attention_block_norm(tokens, dim, heads, dtype):
    torch.manual_seed(tokens + dim)
    width = dim // heads
    check_backend("cpu", 2, tokens, dim, [width] * heads, [width] * heads, dtype, **ALL_ON)
