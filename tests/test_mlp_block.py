"""The fused MLP-only block on every backend against a float64 reference: every activation,
plain and gated (GluMlp / SwiGLU), with and without the inner norm."""
import itertools

import pytest
import torch

from conftest import cpu_backends, requires_cuda, requires_interpreter
from dcvit_engine import ops
from dcvit_engine.kernels.fused_linear import (
    ACTIVATIONS,
    fold_layer_norm,
    gemm_config_name,
    gemm_configs,
    gemm_tile_config,
    linear_residual,
    ln_linear,
)
from dcvit_engine.kernels.mlp_block import mlp_block_ref, mlp_block_triton
from dcvit_engine.ops.dispatch import BackendUnavailableError
from numerics import assert_close_to_reference, poisoned_like

CPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (act, gated, inner norm): every combination
VARIANTS = list(itertools.product(ACTIVATIONS, (False, True), (False, True)))


def variant_id(variant):
    act, gated, inner = variant
    return f"{act}{'-gated' if gated else ''}{'-innernorm' if inner else ''}"


def make_inputs(batch, tokens, dim, hidden, layer_scale, dtype=torch.float64, device="cpu",
                mean=0.5, gated=False, inner_norm=False):
    """Fresh random inputs at realistic scales: LayerNorm affine near 1/0, weights ~ 1/sqrt(fan_in).
    `mean`: the rows' offset (large values test the folded LayerNorm's mean term). gated: fc1
    (2H, D); inner_norm: the options also hold the inner LayerNorm's affine."""
    x = torch.randn(batch, tokens, dim, dtype=torch.float64) * 2 + mean
    width = 2 * hidden if gated else hidden
    weights = [
        1 + 0.2 * torch.randn(dim, dtype=torch.float64),
        0.1 * torch.randn(dim, dtype=torch.float64),
        torch.randn(width, dim, dtype=torch.float64) / dim**0.5,
        0.1 * torch.randn(width, dtype=torch.float64),
        torch.randn(dim, hidden, dtype=torch.float64) / hidden**0.5,
        0.1 * torch.randn(dim, dtype=torch.float64),
    ]
    gamma = torch.rand(dim, dtype=torch.float64) + 0.1 if layer_scale else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    if not (gated or inner_norm):
        return cast(x), [cast(w) for w in weights], cast(gamma)
    inner = dict(inner_norm_weight=1 + 0.2 * torch.randn(hidden, dtype=torch.float64),
                 inner_norm_bias=0.1 * torch.randn(hidden, dtype=torch.float64)) if inner_norm else {}
    return cast(x), [cast(w) for w in weights], cast(gamma), {k: cast(v) for k, v in inner.items()}


def check_backend(backend, batch, tokens, dim, hidden, layer_scale, dtype, device="cpu", mean=0.5,
                  act="gelu", gated=False, inner_norm=False):
    x64, w64, g64, *extra = make_inputs(batch, tokens, dim, hidden, layer_scale, mean=mean, gated=gated,
                                        inner_norm=inner_norm)
    inner64 = extra[0] if extra else {}
    ref64 = mlp_block_ref(x64, *w64, gamma=g64, act=act, gated=gated, **inner64)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    x, w, g = cast(x64), [cast(t) for t in w64], cast(g64)
    inner = {k: cast(v) for k, v in inner64.items()}
    same_precision = mlp_block_ref(x, *w, gamma=g, act=act, gated=gated, **inner)
    out = ops.mlp_block(x, *w, gamma=g, act=act, gated=gated, backend=backend, **inner)
    assert out.shape == x.shape and out.dtype == dtype
    interp_bf16 = backend == "triton" and device == "cpu" and dtype == torch.bfloat16
    assert_close_to_reference(out.cpu(), ref64, same_precision.cpu(), interpreter_bf16=interp_bf16,
                              what=f"{backend} {dtype} N={tokens} D={dim} H={hidden} "
                                   f"{variant_id((act, gated, inner_norm))}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_cpu_backend_variants(variant, dtype):
    act, gated, inner_norm = variant
    check_backend("cpu", 2, 37, 96, 1000, True, dtype, act=act, gated=gated, inner_norm=inner_norm)
    check_backend("cpu", 1, 37, 48, 37, False, dtype, act=act, gated=gated, inner_norm=inner_norm)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_cpu_backend_variants_fp16(variant):
    # fp16 takes ATen's addmm path (no fused oneDNN linears): its own gate and activation code
    act, gated, inner_norm = variant
    check_backend("cpu", 1, 37, 48, 101, True, torch.float16, act=act, gated=gated, inner_norm=inner_norm)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@requires_interpreter
def test_triton_backend_variants_interpreted(variant):
    act, gated, inner_norm = variant
    check_backend("triton", 1, 37, 48, 45, True, torch.float32, act=act, gated=gated, inner_norm=inner_norm)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", [("silu", True, True), ("quick_gelu", False, False),
                                     ("gelu_tanh", True, False)], ids=variant_id)
@requires_interpreter
def test_triton_backend_variants_half_interpreted(variant, dtype):
    act, gated, inner_norm = variant
    check_backend("triton", 1, 37, 48, 45, True, dtype, act=act, gated=gated, inner_norm=inner_norm)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("variant", [("silu", True, True), ("quick_gelu", False, True)], ids=variant_id)
def test_torch_backend_is_the_reference_variants(variant, dtype):
    act, gated, inner_norm = variant
    check_backend("torch", 2, 37, 48, 45, True, dtype, act=act, gated=gated, inner_norm=inner_norm)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("tokens,dim,hidden",
                         [(197, 192, 37), (197, 96, 1000), (50, 192, 3072), (50, 96, 37)])
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
@pytest.mark.parametrize("mean", [40.0, -300.0])
@requires_interpreter
def test_triton_large_row_mean_interpreted(dtype, mean):
    # The folded LayerNorm subtracts mean * sum(W') after the GEMM: rows far from zero mean
    # (std 2) must not lose accuracy to that cancellation. Checked on fc1's output, since the
    # block's residual (|x| ~ |mean|) would hide an error in the branch.
    x64, (nw, nb, w1, b1, *_), _ = make_inputs(1, 50, 96, 37, False, mean=mean)
    fc1 = lambda x, *w: torch.nn.functional.gelu(  # noqa: E731
        torch.nn.functional.linear(torch.nn.functional.layer_norm(x, (96,), w[0], w[1], 1e-6), w[2], w[3]))
    x, *w = (t.to(dtype) for t in (x64[0], nw, nb, w1, b1))
    # reference from the rounded inputs: x's own rounding (~|mean| ulps) would swamp the
    # compute errors compared here
    ref64 = fc1(x.double(), *(t.double() for t in w))
    out = ln_linear(x, *w, 1e-6, act="gelu", launch=lambda kernel: kernel)
    assert_close_to_reference(out, ref64, fc1(x, *w), interpreter_bf16=dtype == torch.bfloat16,
                              what=f"fc1 {dtype} mean {mean}")


@pytest.mark.parametrize("config", gemm_configs("cuda"), ids=gemm_config_name)
@requires_interpreter
def test_every_gpu_tile_config_gated_interpreted(config):
    # the gated GEMM's paired columns through every GPU tile (a 256-wide tile's epilogue runs
    # in halves, each splitting its pairs), hidden width no multiple of any tile
    x64, (nw, nb, w1, b1, *_), _, _ = make_inputs(1, 131, 96, 150, False, gated=True)
    launch = lambda kernel: kernel  # noqa: E731

    def fc1(x, *w):
        gate, value = torch.nn.functional.linear(
            torch.nn.functional.layer_norm(x, (96,), w[0], w[1], 1e-6), w[2], w[3]).chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * value

    rows32, *w32 = (t.float() for t in (x64[0], nw, nb, w1, b1))
    hidden = ln_linear(rows32, *w32, 1e-6, act="silu", gated=True, launch=launch, tile_config=config)
    assert_close_to_reference(hidden, fc1(x64[0], nw, nb, w1, b1), fc1(rows32, *w32),
                              what=f"gated fc1 {gemm_config_name(config)}")


@pytest.mark.parametrize("config", gemm_configs("cuda"), ids=gemm_config_name)
@requires_interpreter
def test_every_gpu_tile_config_interpreted(config):
    # the GPU configs' tiles (128x256 splits its epilogue in halves) on odd shapes, in the
    # interpreter; the fixed CPU tiles never reach those code paths
    x64, (nw, nb, w1, b1, w2, b2), g64 = make_inputs(1, 131, 96, 300, True)
    rows64 = x64[0]
    fc1 = lambda x, *w: torch.nn.functional.gelu(  # noqa: E731
        torch.nn.functional.linear(torch.nn.functional.layer_norm(x, (96,), w[0], w[1], 1e-6), w[2], w[3]))
    launch = lambda kernel: kernel  # noqa: E731
    rows, nw32, nb32, w132, b132, w232, b232, g32 = (t.float() for t in (rows64, nw, nb, w1, b1, w2, b2, g64))
    hidden = ln_linear(rows, nw32, nb32, w132, b132, 1e-6, act="gelu", launch=launch, tile_config=config)
    assert_close_to_reference(hidden, fc1(rows64, nw, nb, w1, b1), fc1(rows, nw32, nb32, w132, b132),
                              what=f"fc1 {gemm_config_name(config)}")
    out = linear_residual(hidden, w232, b232, g32, rows, poisoned_like(rows), launch=launch,
                          tile_config=config)
    ref = rows + g32 * torch.nn.functional.linear(hidden, w232, b232)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_gpu_tile_configs_include_wide_tiles_and_the_fixed_choice():
    configs = gemm_configs("cuda")
    names = [gemm_config_name(c) for c in configs]
    assert "m128n256k64w8s4" in names and "m128n128k64w8s4" in names
    for width in (37, 768, 3072):
        assert gemm_tile_config("cuda", width) in configs


def test_unaligned_shapes_autotune_over_the_spill_free_set():
    from dcvit_engine.kernels import fused_linear

    launched = []

    class _NoLaunch:  # records which kernel (autotuner) would launch; launches nothing
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    def recorder(kernel):
        launched.append(kernel)
        return _NoLaunch()

    kernel = fused_linear._norm_linear_kernel
    for sizes in ((3072, 768, 768, 768, 3072), (568, 384, 384, 384, 568)):
        fused_linear._launch_gemm(kernel, recorder, "cuda", 100, sizes[0], (), {}, None, sizes)
    aligned, unaligned = (sorted(gemm_config_name({**c.kwargs, "num_warps": c.num_warps,
                                                   "num_stages": c.num_stages}) for c in k.configs)
                          for k in launched)
    assert aligned == sorted(map(gemm_config_name, gemm_configs("cuda")))
    assert unaligned == sorted(map(gemm_config_name, gemm_configs("cuda", aligned=False)))
    assert not any("n256" in name for name in unaligned)


def test_fold_layer_norm_is_exact_in_float64():
    x, (nw, nb, w1, b1, *_), _ = make_inputs(1, 7, 48, 37, False)
    folded = fold_layer_norm(nw, nb, w1, b1)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    rstd = (var + 1e-6).rsqrt()
    via_fold = rstd * (x @ folded.weight.t() - mean * folded.sums.double()) + folded.bias.double()
    direct = torch.nn.functional.linear(torch.nn.functional.layer_norm(x, (48,), nw, nb, 1e-6), w1, b1)
    # bias and sums are kept in fp32: agreement to fp32 rounding, not fp64
    torch.testing.assert_close(via_fold, direct, rtol=1e-6, atol=1e-6)
    assert folded.bias.dtype == folded.sums.dtype == torch.float32


@requires_interpreter
def test_prefolded_weights_give_the_same_result():
    x, w, g = make_inputs(1, 50, 96, 37, True, dtype=torch.bfloat16)
    folded = fold_layer_norm(w[0], w[1], w[2], w[3])
    out = ops.mlp_block(x, *w, gamma=g, backend="triton", fc1_folded=folded)
    torch.testing.assert_close(out, ops.mlp_block(x, *w, gamma=g, backend="triton"), rtol=0, atol=0)
    # the other backends ignore the folded weights
    torch.testing.assert_close(ops.mlp_block(x, *w, gamma=g, backend="cpu", fc1_folded=folded),
                               ops.mlp_block(x, *w, gamma=g, backend="cpu"), rtol=0, atol=0)


@requires_interpreter
def test_prefolded_inner_norm_gives_the_same_result():
    x, w, g, inner = make_inputs(1, 37, 48, 45, True, dtype=torch.bfloat16, gated=True, inner_norm=True)
    folded1 = fold_layer_norm(w[0], w[1], w[2], w[3])
    folded2 = fold_layer_norm(inner["inner_norm_weight"], inner["inner_norm_bias"], w[4], w[5])
    kwargs = dict(gamma=g, act="silu", gated=True, backend="triton", **inner)
    torch.testing.assert_close(ops.mlp_block(x, *w, fc1_folded=folded1, fc2_folded=folded2, **kwargs),
                               ops.mlp_block(x, *w, **kwargs), rtol=0, atol=0)


def test_mismatched_folded_weights_are_refused():
    x, w, g = make_inputs(1, 5, 48, 37, True, dtype=torch.float32)
    folded = fold_layer_norm(w[0], w[1], w[2], w[3])
    with pytest.raises(ValueError, match="fc1_folded.weight"):
        ops.mlp_block(x, *w, fc1_folded=folded._replace(weight=folded.weight[:-1]))
    with pytest.raises(ValueError, match="fc1_folded.sums"):
        ops.mlp_block(x, *w, fc1_folded=folded._replace(sums=folded.sums.double()))
    with pytest.raises(ValueError, match="fc2_folded .*needs inner_norm_weight"):
        ops.mlp_block(x, *w, fc2_folded=fold_layer_norm(torch.ones(37), torch.zeros(37), w[4], w[5]))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_torch_backend_is_the_reference(dtype):
    check_backend("torch", 2, 50, 96, 37, True, dtype)


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# D = 100 rows are not 16-byte aligned in bf16 (the CUDA row kernels' ATen fallback);
# H = 37 leaves a GELU tail of fewer than 8 elements
@pytest.mark.parametrize("tokens,dim,hidden", [(197, 192, 37), (197, 768, 3072), (50, 96, 1000),
                                               (50, 100, 37)])
@pytest.mark.parametrize("layer_scale", [False, True])
def test_gpu_backends(backend, tokens, dim, hidden, layer_scale, dtype):
    if backend == "triton" and dtype == torch.float32:
        x, w, g = make_inputs(1, tokens, dim, hidden, layer_scale, dtype=dtype, device="cuda")
        with pytest.raises(BackendUnavailableError, match="fp32 on CUDA"):
            ops.mlp_block(x, *w, gamma=g, backend="triton")
        return
    check_backend(backend, 3, tokens, dim, hidden, layer_scale, dtype, device="cuda")


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
# H = 1000 and 37: 16-byte aligned gate halves and not (the CUDA gate kernel's scalar path)
@pytest.mark.parametrize("hidden", [1000, 37])
def test_gpu_backends_variants(backend, dtype, variant, hidden):
    if backend == "triton" and dtype == torch.float32:
        return  # refused (test_gpu_backends)
    act, gated, inner_norm = variant
    check_backend(backend, 2, 197, 192, hidden, True, dtype, device="cuda", act=act, gated=gated,
                  inner_norm=inner_norm)


@requires_interpreter
def test_triton_writes_every_output_element():
    x, w, g = make_inputs(1, 50, 96, 37, True, dtype=torch.float32)
    out = mlp_block_triton(x, *w, gamma=g, out=poisoned_like(x))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, mlp_block_ref(x, *w, gamma=g), rtol=1e-5, atol=1e-5)


@requires_interpreter
def test_triton_gated_inner_norm_writes_every_output_element():
    x, w, g, inner = make_inputs(1, 37, 48, 45, True, dtype=torch.float32, gated=True, inner_norm=True)
    out = mlp_block_triton(x, *w, gamma=g, act="silu", gated=True, **inner, out=poisoned_like(x))
    torch.testing.assert_close(out, mlp_block_ref(x, *w, gamma=g, act="silu", gated=True, **inner),
                               rtol=1e-5, atol=1e-5)


def test_cpu_out_variant_writes_every_output_element():
    x, w, g = make_inputs(2, 197, 96, 1000, True, dtype=torch.float32)
    out = poisoned_like(x)
    torch.ops.dcvit.mlp_block.out(x, *w, 1e-6, g, out=out)
    torch.testing.assert_close(out, mlp_block_ref(x, *w, gamma=g), rtol=1e-5, atol=1e-5)
    x, w, g, inner = make_inputs(2, 37, 96, 501, True, dtype=torch.float32, gated=True, inner_norm=True)
    out = poisoned_like(x)
    torch.ops.dcvit.mlp_block.out(x, *w, 1e-6, g, "quick_gelu", True, *inner.values(), out=out)
    torch.testing.assert_close(out, mlp_block_ref(x, *w, gamma=g, act="quick_gelu", gated=True, **inner),
                               rtol=1e-5, atol=1e-5)


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_writes_every_output_element(backend):
    x, w, g = make_inputs(2, 197, 96, 1000, True, dtype=torch.float32, device="cuda")
    out = poisoned_like(x)
    if backend == "cuda":
        torch.ops.dcvit.mlp_block.out(x, *w, 1e-6, g, out=out)
    else:
        mlp_block_triton(x, *w, gamma=g, out=out)  # fp32 runs here, only dispatch refuses it
    torch.testing.assert_close(out, mlp_block_ref(x, *w, gamma=g), rtol=1e-5, atol=1e-5)
    x, w, g, inner = make_inputs(2, 197, 96, 501, True, dtype=torch.float32, device="cuda", gated=True,
                                 inner_norm=True)
    out = poisoned_like(x)
    if backend == "cuda":
        torch.ops.dcvit.mlp_block.out(x, *w, 1e-6, g, "silu", True, *inner.values(), out=out)
    else:
        mlp_block_triton(x, *w, gamma=g, act="silu", gated=True, **inner, out=out)
    torch.testing.assert_close(out, mlp_block_ref(x, *w, gamma=g, act="silu", gated=True, **inner),
                               rtol=1e-5, atol=1e-5)


def test_non_contiguous_input():
    x, w, g = make_inputs(2, 50, 96, 37, False, dtype=torch.float32)
    x_t = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    for backend in cpu_backends("torch", "cpu", "triton"):
        torch.testing.assert_close(ops.mlp_block(x_t, *w, backend=backend),
                                   mlp_block_ref(x, *w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=requires_interpreter)])
def test_opcheck(backend):
    x, w, g = make_inputs(2, 9, 48, 37, True, dtype=torch.float32)
    op = torch.ops.dcvit.mlp_block if backend == "cpu" else torch.ops.dcvit._triton_mlp_block
    for gamma in (g, None):
        torch.library.opcheck(op.default, (x, *w, 1e-6, gamma))
    x, w, g, inner = make_inputs(2, 9, 48, 37, True, dtype=torch.float32, gated=True, inner_norm=True)
    torch.library.opcheck(op.default, (x, *w, 1e-6, g, "gelu_tanh", True, *inner.values()))


@pytest.mark.parametrize("backend", ["cpu", "torch", pytest.param("triton", marks=requires_interpreter)])
def test_torch_compile_fullgraph(backend):
    x, w, g = make_inputs(2, 9, 48, 37, True, dtype=torch.float32)

    class MLPOnly(torch.nn.Module):
        def forward(self, inp):
            return ops.mlp_block(inp, *w, gamma=g, backend=backend) * 2

    module = MLPOnly()
    torch.testing.assert_close(torch.compile(module, fullgraph=True)(x), module(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "torch", pytest.param("triton", marks=requires_interpreter)])
def test_torch_compile_fullgraph_gated_inner_norm(backend):
    x, w, g, inner = make_inputs(2, 9, 48, 37, True, dtype=torch.float32, gated=True, inner_norm=True)

    class SwiGLUOnly(torch.nn.Module):
        def forward(self, inp):
            return ops.mlp_block(inp, *w, gamma=g, act="silu", gated=True, backend=backend, **inner) * 2

    module = SwiGLUOnly()
    torch.testing.assert_close(torch.compile(module, fullgraph=True)(x), module(x), rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_named():
    x, w, g = make_inputs(1, 5, 48, 37, True, dtype=torch.float32)
    with pytest.raises(ValueError, match="fc2_weight"):
        ops.mlp_block(x, *w[:4], w[4].t().contiguous(), w[5])
    with pytest.raises(ValueError, match="gamma"):
        ops.mlp_block(x, *w, gamma=g[:-1])
    with pytest.raises(ValueError, match="dtype|is torch.float64"):
        ops.mlp_block(x, w[0].double(), *w[1:])
    with pytest.raises(ValueError, match="act must be one of"):
        ops.mlp_block(x, *w, act="relu")
    with pytest.raises(ValueError, match="odd 37 rows"):
        ops.mlp_block(x, *w, gated=True)
    x, w, g, inner = make_inputs(1, 5, 48, 37, True, dtype=torch.float32, gated=True, inner_norm=True)
    with pytest.raises(ValueError, match="together"):
        ops.mlp_block(x, *w, gated=True, inner_norm_weight=inner["inner_norm_weight"])
    with pytest.raises(ValueError, match="inner_norm_bias must have shape"):
        ops.mlp_block(x, *w, gated=True, **{**inner, "inner_norm_bias": inner["inner_norm_bias"][:-1]})
    with pytest.raises(ValueError, match="fc2_weight must have shape"):
        ops.mlp_block(x, *w)  # a gated fc1 without gated=True


def test_native_checks_name_the_bad_argument():
    # the C++ op checks the same (callers of torch.ops.dcvit.mlp_block skip the Python checks)
    x, w, g, inner = make_inputs(1, 5, 48, 37, True, dtype=torch.float32, gated=True, inner_norm=True)
    with pytest.raises(RuntimeError, match="act must be one of"):
        torch.ops.dcvit.mlp_block(x, *w, 1e-6, g, "relu", True, *inner.values())
    with pytest.raises(RuntimeError, match="fc2_weight must be"):
        torch.ops.dcvit.mlp_block(x, *w, 1e-6, g, "silu", False)
    with pytest.raises(RuntimeError, match="inner_norm_weight must be"):
        torch.ops.dcvit.mlp_block(x, *w, 1e-6, g, "silu", True, inner["inner_norm_weight"][:-1],
                                  inner["inner_norm_bias"])


def test_one_dot_rule_for_every_triton_kernel():
    # The GEMMs, attention and ToMe's matching once wrote their own tl.dot settings and
    # disagreed on fp16 under the interpreter; they now share kernels/launching.py, which
    # upcasts both 16-bit types there (fp16 runs through test_triton_backend_interpreted).
    from dcvit_engine.kernels import attention, fused_linear, launching, token_merge
    for module in (attention, fused_linear, token_merge):
        assert module.dot_precision is launching.dot_precision
        assert module.dot_upcast is launching.dot_upcast
    assert launching.dot_upcast("cpu", torch.float16) and launching.dot_upcast("cpu", torch.bfloat16)
    assert not launching.dot_upcast("cpu", torch.float32)
    assert not any(launching.dot_upcast("cuda", d) for d in CPU_DTYPES)
    assert launching.dot_precision(torch.float32) == "ieee"
    assert launching.dot_precision(torch.float16) == launching.dot_precision(torch.bfloat16) == "tf32"
