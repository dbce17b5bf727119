"""The fused MLP-only block on every backend against a float64 reference."""
import pytest
import torch
from conftest import cpu_backends, requires_cuda, requires_interpreter
from numerics import assert_close_to_reference, poisoned_like

from dcvit_engine import ops
from dcvit_engine.kernels.mlp_block import mlp_block_ref, mlp_block_triton

CPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(batch, tokens, dim, hidden, layer_scale, dtype=torch.float64, device="cpu"):
    """Fresh random inputs at realistic scales: LayerNorm affine near 1/0, weights ~ 1/sqrt(fan_in)."""
    x = torch.randn(batch, tokens, dim, dtype=torch.float64) * 2 + 0.5
    weights = [
        1 + 0.2 * torch.randn(dim, dtype=torch.float64),
        0.1 * torch.randn(dim, dtype=torch.float64),
        torch.randn(hidden, dim, dtype=torch.float64) / dim**0.5,
        0.1 * torch.randn(hidden, dtype=torch.float64),
        torch.randn(dim, hidden, dtype=torch.float64) / hidden**0.5,
        0.1 * torch.randn(dim, dtype=torch.float64),
    ]
    gamma = torch.rand(dim, dtype=torch.float64) + 0.1 if layer_scale else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), [cast(w) for w in weights], cast(gamma)


def check_backend(backend, batch, tokens, dim, hidden, layer_scale, dtype, device="cpu"):
    x64, w64, g64 = make_inputs(batch, tokens, dim, hidden, layer_scale)
    ref64 = mlp_block_ref(x64, *w64, gamma=g64)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    x, w, g = cast(x64), [cast(t) for t in w64], cast(g64)
    same_precision = mlp_block_ref(x, *w, gamma=g)
    out = ops.mlp_block(x, *w, gamma=g, backend=backend)
    assert out.shape == x.shape and out.dtype == dtype
    interp_bf16 = backend == "triton" and device == "cpu" and dtype == torch.bfloat16
    assert_close_to_reference(out.cpu(), ref64, same_precision.cpu(), interpreter_bf16=interp_bf16,
                              what=f"{backend} {dtype} N={tokens} D={dim} H={hidden}")


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("tokens,dim,hidden", [(197, 192, 37), (197, 96, 1000), (50, 192, 3072), (50, 96, 37)])
@pytest.mark.parametrize("layer_scale", [False, True])
def test_cpu_backend(tokens, dim, hidden, layer_scale, dtype):
    check_backend("cpu", 2, tokens, dim, hidden, layer_scale, dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("tokens,dim,hidden", [(50, 96, 37), (197, 96, 1000), (50, 192, 37)])
@pytest.mark.parametrize("layer_scale", [False, True])
@requires_interpreter
def test_triton_backend_interpreted(tokens, dim, hidden, layer_scale, dtype):
    # The interpreter runs every tile in Python: one batch element keeps this fast enough.
    check_backend("triton", 1, tokens, dim, hidden, layer_scale, dtype)


@requires_interpreter
def test_triton_backend_large_hidden_interpreted():
    check_backend("triton", 1, 50, 96, 3072, True, torch.float32)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_torch_backend_is_the_reference(dtype):
    check_backend("torch", 2, 50, 96, 37, True, dtype)


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens,dim,hidden", [(197, 192, 37), (197, 768, 3072), (50, 96, 1000)])
@pytest.mark.parametrize("layer_scale", [False, True])
def test_gpu_backends(backend, tokens, dim, hidden, layer_scale, dtype):
    check_backend(backend, 3, tokens, dim, hidden, layer_scale, dtype, device="cuda")


@requires_interpreter
def test_triton_writes_every_output_element():
    x, w, g = make_inputs(1, 50, 96, 37, True, dtype=torch.float32)
    out = mlp_block_triton(x, *w, gamma=g, out=poisoned_like(x))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, mlp_block_ref(x, *w, gamma=g), rtol=1e-5, atol=1e-5)


def test_cpu_out_variant_writes_every_output_element():
    x, w, g = make_inputs(2, 197, 96, 1000, True, dtype=torch.float32)
    out = poisoned_like(x)
    torch.ops.dcvit.mlp_block.out(x, *w, g, 1e-6, out=out)
    torch.testing.assert_close(out, mlp_block_ref(x, *w, gamma=g), rtol=1e-5, atol=1e-5)


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_writes_every_output_element(backend):
    x, w, g = make_inputs(2, 197, 96, 1000, True, dtype=torch.float32, device="cuda")
    out = poisoned_like(x)
    if backend == "cuda":
        torch.ops.dcvit.mlp_block.out(x, *w, g, 1e-6, out=out)
    else:
        mlp_block_triton(x, *w, gamma=g, out=out)
    torch.testing.assert_close(out, mlp_block_ref(x, *w, gamma=g), rtol=1e-5, atol=1e-5)


def test_non_contiguous_input():
    x, w, g = make_inputs(2, 50, 96, 37, False, dtype=torch.float32)
    x_t = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    for backend in cpu_backends("torch", "cpu", "triton"):
        torch.testing.assert_close(ops.mlp_block(x_t, *w, backend=backend),
                                   mlp_block_ref(x, *w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=requires_interpreter)])
def test_opcheck(backend):
    x, w, g = make_inputs(2, 9, 48, 37, True, dtype=torch.float32)
    op = torch.ops.dcvit.mlp_block if backend == "cpu" else torch.ops.dcvit.mlp_block_triton
    for gamma in (g, None):
        torch.library.opcheck(op.default, (x, *w, gamma, 1e-6))


@pytest.mark.parametrize("backend", ["cpu", "torch", pytest.param("triton", marks=requires_interpreter)])
def test_torch_compile_fullgraph(backend):
    x, w, g = make_inputs(2, 9, 48, 37, True, dtype=torch.float32)

    class MLPOnly(torch.nn.Module):
        def forward(self, inp):
            return ops.mlp_block(inp, *w, gamma=g, backend=backend) * 2

    module = MLPOnly()
    torch.testing.assert_close(torch.compile(module, fullgraph=True)(x), module(x), rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_named():
    x, w, g = make_inputs(1, 5, 48, 37, True, dtype=torch.float32)
    with pytest.raises(ValueError, match="fc2_weight"):
        ops.mlp_block(x, *w[:4], w[4].t().contiguous(), w[5])
    with pytest.raises(ValueError, match="gamma"):
        ops.mlp_block(x, *w, gamma=g[:-1])
    with pytest.raises(ValueError, match="dtype|is torch.float64"):
        ops.mlp_block(x, w[0].double(), *w[1:])
