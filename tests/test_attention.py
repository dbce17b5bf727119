"""The fused attention block (pruned heads and channels) on every backend against a float64
reference: ragged and uniform head widths, optional qkv/proj bias, key bias (proportional
attention) and LayerScale, odd token counts; timm's EvaAttention parts (q/k-norm, RoPE with
and without a row index, the inner norm) on every backend, and against timm's own module."""
import pytest
import torch

from conftest import cpu_backends, requires_cuda, requires_interpreter
from dcvit_engine import ops
from dcvit_engine.kernels.attention import (
    _attention_tile_config,
    attention_block_ref,
    attention_block_triton,
    attention_context_ref,
    flash_attention_triton,
    flash_attention_why_not,
    head_layout,
    tile_split,
)
from dcvit_engine.kernels.fused_linear import fold_layer_norm
from dcvit_engine.ops import attention as attention_dispatch
from dcvit_engine.ops.dispatch import PRIORITY, BackendUnavailableError
from numerics import FACTOR, FLOOR, INTERPRETER_BF16_FACTOR, poisoned_like, rel_err

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RAGGED = ([64, 17, 40], [64, 5, 33])  # as UVC prunes: every head its own widths


def make_inputs(batch, tokens, dim, qk_dims, v_dims, *, qkv_bias=True, proj_bias=True,
                layer_scale=True, key_bias=True, dtype=torch.float64, device="cpu"):
    """Fresh random inputs at realistic scales: LayerNorm affine near 1/0, weights ~
    1/sqrt(fan_in), q/k scaled so logits spread over a few units, key bias = log(size) of
    merged tokens of size 1..4. Returns (x, weights (7 tensors or None), gamma, key_bias)."""
    f64 = dict(dtype=torch.float64)
    qk_total, v_total = sum(qk_dims), sum(v_dims)
    qkv_weight = torch.randn(2 * qk_total + v_total, dim, **f64) / dim**0.5
    qkv_weight[: 2 * qk_total] *= 2.0  # sharper attention than a plain 1/sqrt(D) init
    weights = [
        1 + 0.2 * torch.randn(dim, **f64),
        0.1 * torch.randn(dim, **f64),
        qkv_weight,
        0.1 * torch.randn(2 * qk_total + v_total, **f64) if qkv_bias else None,
        torch.randn(dim, v_total, **f64) / v_total**0.5,
        0.1 * torch.randn(dim, **f64) if proj_bias else None,
    ]
    x = torch.randn(batch, tokens, dim, **f64) * 2 + 0.5
    gamma = torch.rand(dim, **f64) + 0.5 if layer_scale else None
    bias = torch.randint(1, 5, (batch, tokens)).to(torch.float64).log() if key_bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), [cast(w) for w in weights], cast(gamma), cast(bias)


def assert_branch_close(out, x, ref64, same_precision, *, interpreter_bf16=False, what=""):
    """Compares the attention branch out - x (the residual x would hide its error) against
    the float64 reference: at most FACTOR times plain PyTorch's same-precision error."""
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten or overflowed output)"
    x64 = x.double().cpu()
    branch_ref = ref64 - x64
    factor = INTERPRETER_BF16_FACTOR if interpreter_bf16 else FACTOR
    budget = factor * rel_err(same_precision.cpu().double() - x64, branch_ref) + FLOOR[out.dtype]
    err = rel_err(out.cpu().double() - x64, branch_ref)
    assert err <= budget, f"{what}: relative error {err:.3e} of the branch > budget {budget:.3e}"


def check_backend(backend, batch, tokens, dim, qk_dims, v_dims, dtype, device="cpu", **flags):
    x64, w64, g64, kb64 = make_inputs(batch, tokens, dim, qk_dims, v_dims, **flags)
    scale = 64 ** -0.5  # the teacher's, kept after channel pruning
    ref64 = attention_block_ref(x64, *w64, qk_dims, v_dims, scale, gamma=g64, key_bias=kb64)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    x, w, g, kb = cast(x64), [cast(t) for t in w64], cast(g64), cast(kb64)
    same_precision = attention_block_ref(x, *w, qk_dims, v_dims, scale, gamma=g, key_bias=kb)
    out = ops.attention_block(x, *w, qk_dims, v_dims, scale, gamma=g, key_bias=kb, backend=backend)
    assert out.shape == x.shape and out.dtype == dtype
    interp_bf16 = backend == "triton" and device == "cpu" and dtype == torch.bfloat16
    assert_branch_close(out, x, ref64, same_precision, interpreter_bf16=interp_bf16,
                        what=f"{backend} {dtype} N={tokens} D={dim} qk={qk_dims} v={v_dims} {flags}")


# (batch, tokens, dim, qk_dims, v_dims, optional parts)
ALL_ON = dict(qkv_bias=True, proj_bias=True, layer_scale=True, key_bias=True)
ALL_OFF = dict(qkv_bias=False, proj_bias=False, layer_scale=False, key_bias=False)
PROP_ATTN = dict(qkv_bias=False, proj_bias=True, layer_scale=False, key_bias=True)
CPU_CASES = [
    (2, 197, 192, *RAGGED, ALL_ON),
    (2, 197, 192, *RAGGED, ALL_OFF),
    (2, 197, 384, [32] * 6, [32] * 6, PROP_ATTN),            # half the channels of DeiT-S
    (2, 65, 96, [8] * 12, [8] * 12, ALL_ON),                 # 12 heads
    (3, 50, 96, [16, 16, 5, 16, 12, 16], [16, 3, 16, 16, 9, 16], PROP_ATTN),  # mixed groups
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,tokens,dim,qk_dims,v_dims,flags", CPU_CASES)
def test_cpu_backend(batch, tokens, dim, qk_dims, v_dims, flags, dtype):
    check_backend("cpu", batch, tokens, dim, qk_dims, v_dims, dtype, **flags)


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_backend_is_the_reference(dtype):
    check_backend("torch", 2, 197, 96, [16, 7, 12], [16, 3, 12], dtype, **ALL_ON)


# The interpreter runs every tile in Python: one or two batch elements, small D.
TRITON_CASES = [
    (1, 65, 96, [32, 9, 20], [32, 5, 16], ALL_ON),           # ragged, three padded widths
    (1, 50, 48, [8] * 6, [8] * 6, ALL_OFF),                  # uniform pruned, 6 heads
    (2, 50, 64, [16, 16, 16], [16, 16, 16], PROP_ATTN),      # dense 3 heads
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,tokens,dim,qk_dims,v_dims,flags", TRITON_CASES)
@requires_interpreter
def test_triton_backend_interpreted(batch, tokens, dim, qk_dims, v_dims, flags, dtype):
    check_backend("triton", batch, tokens, dim, qk_dims, v_dims, dtype, **flags)


@requires_interpreter
def test_triton_ragged_full_width_head_interpreted():
    check_backend("triton", 1, 50, 64, *RAGGED, torch.float32, **PROP_ATTN)


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,tokens,dim,qk_dims,v_dims,flags", CPU_CASES + [
    (4, 197, 768, [64] * 12, [64] * 12, ALL_ON),
    (4, 197, 768, [64] * 6, [64] * 6, PROP_ATTN),
])
def test_gpu_backends(backend, batch, tokens, dim, qk_dims, v_dims, flags, dtype):
    if backend == "triton" and dtype == torch.float32:
        x, w, g, kb = make_inputs(batch, tokens, dim, qk_dims, v_dims, dtype=dtype, device="cuda")
        with pytest.raises(BackendUnavailableError, match="fp32 on CUDA"):
            ops.attention_block(x, *w, qk_dims, v_dims, 0.125, gamma=g, key_bias=kb, backend="triton")
        return
    check_backend(backend, batch, tokens, dim, qk_dims, v_dims, dtype, device="cuda", **flags)


class _FakeTensor:
    """Just the device and dtype a backend's refusal reads (no CUDA device here)."""

    def __init__(self, device, dtype):
        self.device, self.dtype = torch.device(device), dtype


def test_triton_refusals_fp32_on_cuda_and_wide_heads():
    refuse = attention_dispatch.ATTENTION_BLOCK.dispatcher.impls["triton"].why_not
    weights = [None] * 6
    assert "fp32 on CUDA" in refuse(_FakeTensor("cuda", torch.float32), *weights, [64], [64])
    assert refuse(_FakeTensor("cuda", torch.bfloat16), *weights, [64, 48], [64, 16]) is None
    assert "head width 160" in refuse(_FakeTensor("cuda", torch.float16), *weights, [160], [64])
    assert attention_dispatch.ATTENTION_BLOCK.dispatcher.priority is PRIORITY["attention_block"]


def check_flash_core(qk_dims, v_dims, dtype, batch=2, tokens=37):
    """The attention kernel alone against the per-head float64 reference, writing into a
    NaN-poisoned context."""
    qkv = torch.randn(batch, tokens, 2 * sum(qk_dims) + sum(v_dims), dtype=torch.float64)
    key_bias = torch.rand(batch, tokens, dtype=torch.float64)
    ref = attention_context_ref(qkv, qk_dims, v_dims, 0.3, key_bias)
    same = attention_context_ref(qkv.to(dtype), qk_dims, v_dims, 0.3, key_bias.to(dtype))
    ctx = flash_attention_triton(qkv.to(dtype).reshape(batch * tokens, -1), batch, tokens, qk_dims,
                                 v_dims, 0.3, key_bias.to(dtype),
                                 ctx=torch.full((batch * tokens, sum(v_dims)), float("nan"), dtype=dtype))
    factor = INTERPRETER_BF16_FACTOR if dtype == torch.bfloat16 else FACTOR
    budget = factor * rel_err(same.double(), ref) + FLOOR[dtype]
    assert rel_err(ctx.reshape(batch, tokens, -1).double(), ref) <= budget


@requires_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_dims,v_dims", [
    ([16, 17, 1, 33], [31, 1, 16, 15]),   # general table: widths on both sides of 16, 32
    ([48] * 3, [48] * 3),                 # uniform, tiles split 32 + 16
    ([64, 16, 48, 32], [32, 48, 16, 64]),  # aligned table (build_engine's padded UVC heads)
    ([96, 32], [80, 16]),                  # aligned, split 64 + 32 and 64 + 16
])
def test_flash_core_layouts_interpreted(qk_dims, v_dims, dtype):
    check_flash_core(qk_dims, v_dims, dtype)


def test_tile_split_pads_to_16_not_powers_of_two():
    assert [tile_split(w) for w in (1, 16, 17, 33, 40, 48, 64, 80, 96, 112, 128)] == [
        (16, 0), (16, 0), (32, 0), (32, 16), (32, 16), (32, 16), (64, 0), (64, 16), (64, 32),
        (128, 0), (128, 0)]


def test_tile_config_by_launch_size_and_arch():
    """128 query rows (8 warps) on sm_90 when the launch fills the GPU, else 64 rows (4 warps);
    sm_80 always 64 rows; keys in blocks of 32 past 64 columns; small tiles in the interpreter."""
    big, small = dict(batch_heads=256 * 12, tokens=197), dict(batch_heads=12, tokens=197)
    assert _attention_tile_config("cuda", 64, 64, **big)["BLOCK_M"] == 128
    assert _attention_tile_config("cuda", 64, 64, **big)["num_warps"] == 8
    assert _attention_tile_config("cuda", 64, 64, **small)["BLOCK_M"] == 64
    assert _attention_tile_config("cuda", 64, 64, **big, arch=80)["BLOCK_M"] == 64
    assert _attention_tile_config("cuda", 128, 64, **big)["BLOCK_N"] == 32
    assert _attention_tile_config("cpu", 64, 64)["BLOCK_M"] == 32


def test_head_layout_specializations():
    dense = head_layout([64] * 12, [64] * 12)
    assert dense.uniform and dense.aligned and dense.dqk == dense.dv == (64, 0)
    padded = head_layout([64, 32, 48], [64, 16, 48])  # RAGGED as build_engine pads it
    assert not padded.uniform and padded.aligned and padded.dqk == (64, 0)
    assert padded.table == ((0, 64, 96), (144, 208, 240), (288, 352, 368), (0, 64, 80),
                            (64, 32, 48), (64, 16, 48))
    raw = head_layout(*RAGGED)
    assert not raw.uniform and not raw.aligned and raw.dv == (64, 0)
    assert not head_layout([8] * 6, [8] * 6).uniform  # narrower than the 16-wide tile


@requires_interpreter  # the triton backend on CPU tensors
def test_wide_heads_are_refused_with_the_reason():
    assert flash_attention_why_not([64, 128], [128, 64]) is None
    assert "head width 144" in flash_attention_why_not([144], [64])
    x, w, _, _ = make_inputs(1, 5, 32, [144], [16], dtype=torch.float32)
    assert "head width 144" in ops.attention_block_backends(x, *w, [144], [16], 0.25)["triton"]


@requires_interpreter
def test_triton_takes_prefolded_qkv_interpreted():
    """The engine folds LayerNorm into the qkv weights once; the op then skips its own fold."""
    qk_dims, v_dims = [32, 16, 48], [16, 32, 48]  # padded widths, as the engine passes them
    x, w, g, kb = make_inputs(2, 37, 48, qk_dims, v_dims, dtype=torch.float32)
    folded = fold_layer_norm(w[0], w[1], w[2], w[3])
    out = ops.attention_block(x, *w, qk_dims, v_dims, 0.25, gamma=g, key_bias=kb, backend="triton",
                              qkv_folded=folded)
    torch.testing.assert_close(out, attention_block_ref(x, *w, qk_dims, v_dims, 0.25, gamma=g,
                                                        key_bias=kb), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="qkv_folded"):
        ops.attention_block(x, *w, qk_dims, v_dims, 0.25, backend="triton",
                            qkv_folded=folded._replace(sums=folded.sums[1:]))


@requires_interpreter
def test_triton_writes_every_output_element():
    x, w, g, kb = make_inputs(1, 50, 48, [16, 5, 12], [16, 3, 9], dtype=torch.float32)
    out = attention_block_triton(x, *w, [16, 5, 12], [16, 3, 9], 0.25, gamma=g, key_bias=kb,
                                 out=poisoned_like(x))
    torch.testing.assert_close(out, attention_block_ref(x, *w, [16, 5, 12], [16, 3, 9], 0.25,
                                                        gamma=g, key_bias=kb), rtol=1e-5, atol=1e-5)


def test_cpu_out_variant_writes_every_output_element():
    x, w, g, kb = make_inputs(2, 197, 96, *RAGGED, dtype=torch.float32)
    out = poisoned_like(x)
    torch.ops.dcvit.attention_block.out(x, *w, *RAGGED, 0.125, 1e-6, g, kb, out=out)
    torch.testing.assert_close(out, attention_block_ref(x, *w, *RAGGED, 0.125, gamma=g, key_bias=kb),
                               rtol=1e-5, atol=1e-5)


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_writes_every_output_element(backend):
    x, w, g, kb = make_inputs(2, 197, 96, *RAGGED, dtype=torch.float32, device="cuda")
    out = poisoned_like(x)
    if backend == "cuda":
        torch.ops.dcvit.attention_block.out(x, *w, *RAGGED, 0.125, 1e-6, g, kb, out=out)
    else:
        attention_block_triton(x, *w, *RAGGED, 0.125, gamma=g, key_bias=kb, out=out)
    torch.testing.assert_close(out, attention_block_ref(x, *w, *RAGGED, 0.125, gamma=g, key_bias=kb),
                               rtol=1e-4, atol=1e-4)


def test_non_contiguous_inputs():
    x, w, g, kb = make_inputs(2, 50, 48, [16, 5], [8, 16], dtype=torch.float32)
    x_t = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    kb_t = kb.t().contiguous().t()
    expected = attention_block_ref(x, *w, [16, 5], [8, 16], 0.25, gamma=g, key_bias=kb)
    for backend in cpu_backends("torch", "cpu", "triton"):
        torch.testing.assert_close(ops.attention_block(x_t, *w, [16, 5], [8, 16], 0.25, gamma=g,
                                                       key_bias=kb_t, backend=backend),
                                   expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=requires_interpreter)])
def test_opcheck(backend):
    qk_dims, v_dims = [16, 5], [8, 16]
    x, w, g, kb = make_inputs(2, 9, 32, qk_dims, v_dims, dtype=torch.float32)
    op = torch.ops.dcvit.attention_block if backend == "cpu" else torch.ops.dcvit._triton_attention_block
    torch.library.opcheck(op.default, (x, *w, qk_dims, v_dims, 0.25, 1e-6, g, kb))
    no_optional = [t if i not in (3, 5) else None for i, t in enumerate(w)]
    torch.library.opcheck(op.default, (x, *no_optional, qk_dims, v_dims, 0.25, 1e-6, None, None))


def test_torch_compile_fullgraph_cpu_backend():
    qk_dims, v_dims = [16, 5, 12], [16, 3, 9]
    x, w, g, kb = make_inputs(2, 9, 48, qk_dims, v_dims, dtype=torch.float32)

    class AttentionOnly(torch.nn.Module):
        def forward(self, inp, key_bias):
            return ops.attention_block(inp, *w, qk_dims, v_dims, 0.25, gamma=g, key_bias=key_bias,
                                       backend="cpu") * 2

    module = AttentionOnly()
    compiled = torch.compile(module, fullgraph=True)
    torch.testing.assert_close(compiled(x, kb), module(x, kb), rtol=1e-5, atol=1e-5)


def test_backend_reasons():
    x, w, g, kb = make_inputs(1, 5, 32, [8], [8], dtype=torch.float32)
    reasons = ops.attention_block_backends(x, *w, [8], [8], 0.25, gamma=g, key_bias=kb)
    assert reasons["torch"] is None and reasons["cpu"] is None
    assert "CUDA" in reasons["cuda"] or "cuda" in reasons["cuda"]


def test_bad_inputs_are_named():
    qk_dims, v_dims = [16, 5], [8, 16]
    x, w, g, kb = make_inputs(2, 9, 32, qk_dims, v_dims, dtype=torch.float32)
    with pytest.raises(ValueError, match="qkv_weight.*qk_dims"):
        ops.attention_block(x, *w, [16, 6], v_dims, 0.25)  # widths do not match the qkv rows
    with pytest.raises(ValueError, match="key_bias"):
        ops.attention_block(x, *w, qk_dims, v_dims, 0.25, key_bias=kb[:, :-1])
    with pytest.raises(ValueError, match="key_bias"):
        ops.attention_block(x, *w, qk_dims, v_dims, 0.25, key_bias=kb[0])
    with pytest.raises(ValueError, match="same number"):
        ops.attention_block(x, *w, qk_dims, v_dims + [1], 0.25)
    with pytest.raises(ValueError, match=">= 1"):
        ops.attention_block(x, *w, [21, 0], v_dims, 0.25)
    with pytest.raises(ValueError, match="list of ints"):
        ops.attention_block(x, *w, [16.0, 5.0], v_dims, 0.25)
    with pytest.raises(ValueError, match="proj_weight"):
        ops.attention_block(x, *w[:4], w[4][:, 1:], w[5], qk_dims, v_dims, 0.25)
    with pytest.raises(ValueError, match="gamma"):
        ops.attention_block(x, *w, qk_dims, v_dims, 0.25, gamma=g[:-1])
    with pytest.raises(ValueError, match="scale"):
        ops.attention_block(x, *w, qk_dims, v_dims, float("nan"))
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        ops.attention_block(x[0], *w, qk_dims, v_dims, 0.25)
    with pytest.raises(ValueError, match="qkv_bias is torch.float64"):
        ops.attention_block(x, *w[:3], w[3].double(), *w[4:], qk_dims, v_dims, 0.25)


def test_cpp_checks_name_the_argument():
    qk_dims, v_dims = [16, 5], [8, 16]
    x, w, g, kb = make_inputs(2, 9, 32, qk_dims, v_dims, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="qkv_weight"):
        torch.ops.dcvit.attention_block(x, *w, [16, 6], v_dims, 0.25, 1e-6, g, kb)
    with pytest.raises(RuntimeError, match="key_bias"):
        torch.ops.dcvit.attention_block(x, *w, qk_dims, v_dims, 0.25, 1e-6, g, kb[:, :-1])


# ---- q/k-norm (timm qk_norm=True) ----

def qk_norm_inputs(dtype=torch.float64):
    heads, width = 3, 16
    x, w, g, kb = make_inputs(2, 11, 40, [width] * heads, [width] * heads, dtype=dtype)
    norms = [(1 + 0.3 * torch.randn(width, dtype=dtype), 0.2 * torch.randn(width, dtype=dtype))
             for _ in range(2)]
    return x, w, g, kb, [width] * heads, norms


def timm_qk_norm_attention(x, w, g, kb, dims, q_norm, k_norm, scale, eps=1e-6):
    """timm's Attention with qk_norm, written out with SDPA on (B, heads, N, d) tensors."""
    norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias = w
    h = torch.nn.functional.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    q, k, v = torch.nn.functional.linear(h, qkv_weight, qkv_bias).split(
        [sum(dims), sum(dims), sum(dims)], -1)
    q, k, v = (t.unflatten(-1, (len(dims), dims[0])).transpose(1, 2) for t in (q, k, v))
    q = torch.nn.functional.layer_norm(q, (dims[0],), *q_norm, eps)
    k = torch.nn.functional.layer_norm(k, (dims[0],), *k_norm, eps)
    ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=kb[:, None, None, :],
                                                           scale=scale)
    y = torch.nn.functional.linear(ctx.transpose(1, 2).flatten(2), proj_weight, proj_bias)
    return x + y * g


def test_qk_norm_on_the_torch_backend_is_timms_attention():
    x, w, g, kb, dims, (q_norm, k_norm) = qk_norm_inputs()
    out = ops.attention_block(x, *w, dims, dims, 0.3, gamma=g, key_bias=kb, q_norm=q_norm,
                              k_norm=k_norm, backend="torch")
    expected = timm_qk_norm_attention(x, w, g, kb, dims, q_norm, k_norm, 0.3)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    plain = ops.attention_block(x, *w, dims, dims, 0.3, gamma=g, key_bias=kb, backend="torch")
    assert (out - plain).abs().max() > 1e-3, "q/k-norm must change the result"


def test_qk_norm_runs_on_every_backend_and_a_refusal_names_the_inputs():
    x, w, g, kb, dims, (q_norm, k_norm) = qk_norm_inputs(torch.float32)
    kwargs = dict(gamma=g, key_bias=kb, q_norm=q_norm, k_norm=k_norm)
    reasons = ops.attention_block_backends(x, *w, dims, dims, 0.3, **kwargs)
    for backend in cpu_backends("torch", "cpu", "triton"):
        assert reasons[backend] is None, backend
    x64, w64, g64, kb64, dims, (q64, k64) = qk_norm_inputs(torch.float64)
    with pytest.raises(BackendUnavailableError) as info:
        ops.attention_block(x64, *w64, dims, dims, 0.3, gamma=g64, key_bias=kb64, q_norm=q64,
                            k_norm=k64, backend="cpu")
    message = str(info.value)
    # every backend's reason, then the inputs described (shape, dtype, device)
    assert "torch: available" in message and "cpu: dtype torch.float64" in message
    assert "x: (2, 11, 40) float64 on cpu" in message and "qk_dims: [16, 16, 16]" in message
    assert "q_norm_weight: (16,) float64 on cpu" in message


def test_bad_qk_norm_is_named():
    x, w, g, kb, dims, (q_norm, k_norm) = qk_norm_inputs(torch.float32)
    with pytest.raises(ValueError, match="both q_norm and k_norm"):
        ops.attention_block(x, *w, dims, dims, 0.3, q_norm=q_norm)
    with pytest.raises(ValueError, match="k_norm weight must have shape"):
        ops.attention_block(x, *w, dims, dims, 0.3, q_norm=q_norm, k_norm=(k_norm[0][:-1], k_norm[1]))
    with pytest.raises(ValueError, match="q_norm bias is torch.float64"):
        ops.attention_block(x, *w, dims, dims, 0.3, q_norm=(q_norm[0], q_norm[1].double()), k_norm=k_norm)
    with pytest.raises(ValueError, match="one q/k width"):
        ragged = ops.attention_block  # heads of different widths cannot share one LayerNorm
        xr, wr, _, _ = make_inputs(1, 5, 40, [16, 8], [16, 8], dtype=torch.float32)
        ragged(xr, *wr, [16, 8], [16, 8], 0.3, q_norm=q_norm, k_norm=k_norm)


# ---- EvaAttention parts: q/k-norm, RoPE (with and without an index), the inner norm ------

def eva_parts(batch, tokens, qk_dims, v_dims, *, qk_norm=False, rope=False, index=False,
              inner_norm=False, prefix=1):
    """Fresh float64 extras (RoPE tables float32) as the public op takes them: the tables'
    first `prefix` rows are cos 1 / sin 0 (class and register tokens); with `index` the
    tables hold more rows than tokens and each token picks one (merged tokens keep a row),
    prefix tokens row 0."""
    f64 = dict(dtype=torch.float64)
    parts = {}
    if qk_norm:
        width = qk_dims[0]
        parts["q_norm"] = (1 + 0.3 * torch.randn(width, **f64), 0.2 * torch.randn(width, **f64))
        parts["k_norm"] = (1 + 0.3 * torch.randn(width, **f64), 0.2 * torch.randn(width, **f64))
    if rope:
        positions = tokens + 7 if index else tokens
        angles = torch.rand(positions, sum(qk_dims)) * 6.0 - 3.0
        angles[:prefix] = 0.0
        parts["rope_cos"], parts["rope_sin"] = angles.cos(), angles.sin()
        if index:
            rows = torch.randint(prefix, positions, (batch, tokens))
            rows[:, :prefix] = 0
            parts["rope_index"] = rows
    if inner_norm:
        parts["inner_norm_weight"] = 1 + 0.3 * torch.randn(sum(v_dims), **f64)
        parts["inner_norm_bias"] = 0.2 * torch.randn(sum(v_dims), **f64)
    return parts


def cast_parts(parts, dtype, device="cpu"):
    """The extras for inputs of `dtype`: norms in it, tables float32, the index int64."""
    def one(value):
        if isinstance(value, tuple):
            return tuple(one(v) for v in value)
        if value.is_floating_point() and value.dtype == torch.float64:
            return value.to(device=device, dtype=dtype)
        return value.to(device)
    return {name: one(value) for name, value in parts.items()}


def reference_keywords(parts):
    """The public op's keywords as attention_block_ref's schema arguments."""
    out = {k: v for k, v in parts.items() if k not in ("q_norm", "k_norm")}
    for name in ("q_norm", "k_norm"):
        if name in parts:
            out[f"{name}_weight"], out[f"{name}_bias"] = parts[name]
    return out


def check_eva_backend(backend, batch, tokens, dim, qk_dims, v_dims, dtype, parts_flags, device="cpu"):
    x64, w64, g64, kb64 = make_inputs(batch, tokens, dim, qk_dims, v_dims)
    parts64 = eva_parts(batch, tokens, qk_dims, v_dims, **parts_flags)
    scale = 0.3
    ref64 = attention_block_ref(x64, *w64, qk_dims, v_dims, scale, gamma=g64, key_bias=kb64,
                                **reference_keywords(parts64))
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    x, w, g, kb = cast(x64), [cast(t) for t in w64], cast(g64), cast(kb64)
    parts = cast_parts(parts64, dtype, device)
    same_precision = attention_block_ref(x, *w, qk_dims, v_dims, scale, gamma=g, key_bias=kb,
                                         **reference_keywords(parts))
    out = ops.attention_block(x, *w, qk_dims, v_dims, scale, gamma=g, key_bias=kb, backend=backend,
                              **parts)
    assert out.shape == x.shape and out.dtype == dtype
    interp_bf16 = backend == "triton" and device == "cpu" and dtype == torch.bfloat16
    assert_branch_close(out, x, ref64, same_precision, interpreter_bf16=interp_bf16,
                        what=f"{backend} {dtype} qk={qk_dims} v={v_dims} {parts_flags}")
    plain = attention_block_ref(x64, *w64, qk_dims, v_dims, scale, gamma=g64, key_bias=kb64)
    assert (ref64 - plain).abs().max() > 1e-3, "the extras must change the result"


RAGGED_EVEN = ([16, 6, 12], [16, 3, 9])     # pruned heads of unequal widths, even for RoPE
EVA_CASES = [
    # (qk_dims, v_dims, extras): ragged widths off 16 (Triton pads them) and padded-free ones
    (*RAGGED_EVEN, dict(rope=True)),
    (*RAGGED_EVEN, dict(rope=True, index=True, prefix=2)),
    (*RAGGED_EVEN, dict(inner_norm=True)),
    ([10] * 3, [7] * 3, dict(qk_norm=True)),
    ([10] * 3, [7] * 3, dict(qk_norm=True, rope=True, index=True, inner_norm=True)),
    ([16] * 2, [16] * 2, dict(qk_norm=True, rope=True, inner_norm=True)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_dims,v_dims,flags", EVA_CASES)
@pytest.mark.parametrize("backend", ["torch", "cpu", pytest.param("triton", marks=requires_interpreter)])
def test_eva_parts_on_every_cpu_backend(backend, qk_dims, v_dims, flags, dtype):
    check_eva_backend(backend, 2, 21, 40, qk_dims, v_dims, dtype, flags)


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("qk_dims,v_dims,flags", EVA_CASES + [
    ([64] * 6, [64] * 6, dict(qk_norm=True, rope=True, index=True, inner_norm=True)),
])
def test_eva_parts_on_gpu_backends(backend, qk_dims, v_dims, flags, dtype):
    check_eva_backend(backend, 3, 197, 96, qk_dims, v_dims, dtype, flags, device="cuda")


def test_rope_is_timms_rotate_half():
    """The op's RoPE on one head is timm's apply_rot_embed(half=True) on the same tables."""
    from timm.layers.pos_embed_sincos import apply_rot_embed

    from dcvit_engine.kernels.head_norm_rope import rotate_half_ref
    t = torch.randn(2, 9, 12, dtype=torch.float64)
    angles = torch.rand(9, 6, dtype=torch.float64)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    torch.testing.assert_close(rotate_half_ref(t, cos, sin), apply_rot_embed(t, sin, cos, half=True),
                               rtol=0, atol=1e-15)


def interleaved_to_half_split(width):
    """timm's interleaved RoPE pairs channels (2i, 2i+1); the op pairs (i, i + d/2). Listing
    each head's even channels then its odd ones maps one onto the other: this permutation of
    the q and k rows of qkv (and of the q/k-norm weights and the table columns) leaves
    q k^T unchanged."""
    return torch.cat([torch.arange(0, width, 2), torch.arange(1, width, 2)])


def test_timm_eva_attention_with_interleaved_rope_runs_on_the_op():
    """timm's EvaAttention (q/k-norm, interleaved RoPE from cat([sin, cos]), a prefix token,
    the inner norm) equals the op given the permuted weights and half-split tables."""
    from functools import partial

    from timm.models.eva import EvaAttention
    dim, heads, width, tokens, prefix = 48, 3, 16, 10, 1
    attn = EvaAttention(dim, heads, qkv_bias=True, num_prefix_tokens=prefix, qk_norm=True,
                        scale_norm=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(0.2 * torch.randn_like(p))
    freqs = torch.rand(tokens - prefix, width // 2, dtype=torch.float64) * 3
    # interleaved layout [f0, f0, f1, f1, ..]; float32 values, as the op's tables hold them
    sin, cos = (f(freqs).float().double().repeat_interleave(2, -1) for f in (torch.sin, torch.cos))
    x = torch.randn(2, tokens, dim, dtype=torch.float64)

    perm = interleaved_to_half_split(width)
    rows = torch.cat([h * width + perm for h in range(heads)])          # within q (and k)
    qkv_rows = torch.cat([rows, heads * width + rows, 2 * heads * width + torch.arange(heads * width)])
    qkv_bias = torch.cat([attn.q_bias, attn.k_bias, attn.v_bias])
    table = lambda t: torch.cat([torch.full((prefix, heads * width), float(t is cos)),  # noqa: E731
                                 t[:, perm].repeat(1, heads)]).float()
    ident = torch.ones(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64)
    out = ops.attention_block(
        x, *ident, attn.qkv.weight[qkv_rows], qkv_bias[qkv_rows], attn.proj.weight, attn.proj.bias,
        [width] * heads, [width] * heads, attn.scale,
        q_norm=(attn.q_norm.weight[perm], attn.q_norm.bias[perm]),
        k_norm=(attn.k_norm.weight[perm], attn.k_norm.bias[perm]),
        rope_cos=table(cos), rope_sin=table(sin),
        inner_norm_weight=attn.norm.weight, inner_norm_bias=attn.norm.bias, backend="torch")
    # the op's block LayerNorm (weight 1, bias 0) is not timm's attention: feed timm its output
    normed = torch.nn.functional.layer_norm(x, (dim,), *ident, 1e-6)
    expected = x + attn(normed, rope=torch.cat([sin, cos], -1))
    torch.testing.assert_close(out.detach(), expected.detach(), rtol=1e-10, atol=1e-10)


def eva_inputs(dtype=torch.float32, index=True):
    qk_dims, v_dims = RAGGED_EVEN
    x, w, g, kb = make_inputs(2, 9, 32, qk_dims, v_dims, dtype=dtype)
    parts = cast_parts(eva_parts(2, 9, qk_dims, v_dims, rope=True, index=index, inner_norm=True), dtype)
    return x, w, g, kb, qk_dims, v_dims, parts


def schema_extras(parts):
    """The extras in the schema's order (q/k-norm absent here)."""
    return (None, None, None, None, parts["rope_cos"], parts["rope_sin"], parts.get("rope_index"),
            parts["inner_norm_weight"], parts["inner_norm_bias"])


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=requires_interpreter)])
def test_eva_parts_write_every_output_element(backend):
    x, w, g, kb, qk_dims, v_dims, parts = eva_inputs()
    expected = attention_block_ref(x, *w, qk_dims, v_dims, 0.25, 1e-6, g, kb, *schema_extras(parts))
    out = poisoned_like(x)
    if backend == "cpu":
        torch.ops.dcvit.attention_block.out(x, *w, qk_dims, v_dims, 0.25, 1e-6, g, kb,
                                            *schema_extras(parts), out=out)
    else:
        attention_block_triton(x, *w, qk_dims, v_dims, 0.25, 1e-6, g, kb, *schema_extras(parts), out=out)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=requires_interpreter)])
def test_opcheck_eva_parts(backend):
    x, w, g, kb, qk_dims, v_dims, parts = eva_inputs()
    op = torch.ops.dcvit.attention_block if backend == "cpu" else torch.ops.dcvit._triton_attention_block
    torch.library.opcheck(op.default, (x, *w, qk_dims, v_dims, 0.25, 1e-6, g, kb, *schema_extras(parts)))


def test_torch_compile_fullgraph_eva_parts_cpu_backend():
    x, w, g, kb, qk_dims, v_dims, parts = eva_inputs()

    class EvaAttentionOnly(torch.nn.Module):
        def forward(self, inp, rope_index):
            return ops.attention_block(inp, *w, qk_dims, v_dims, 0.25, gamma=g, key_bias=kb,
                                       **{**parts, "rope_index": rope_index}, backend="cpu") * 2

    module = EvaAttentionOnly()
    compiled = torch.compile(module, fullgraph=True)
    torch.testing.assert_close(compiled(x, parts["rope_index"]), module(x, parts["rope_index"]),
                               rtol=1e-5, atol=1e-5)


def test_bad_eva_parts_are_named():
    x, w, g, kb, qk_dims, v_dims, parts = eva_inputs()
    call = lambda dims=qk_dims, **kw: ops.attention_block(x, *w, dims, v_dims, 0.25,  # noqa: E731
                                                          **{**parts, **kw})
    with pytest.raises(ValueError, match="both rope_cos and rope_sin"):
        call(rope_sin=None)
    with pytest.raises(ValueError, match="rope_index without"):
        call(rope_cos=None, rope_sin=None)
    with pytest.raises(ValueError, match="float32 table"):
        call(rope_cos=parts["rope_cos"][:, 1:])
    with pytest.raises(ValueError, match="rope_index must be an int32/int64"):
        call(rope_index=parts["rope_index"].float())
    too_far = parts["rope_index"].clone()
    too_far[1, -1] = 16
    with pytest.raises(ValueError, match=r"index the tables' 16 rows, got values in \[0, 16\]"):
        call(rope_index=too_far)
    with pytest.raises(ValueError, match="need N=9 rows, got 16; pass rope_index"):
        call(rope_index=None)
    with pytest.raises(ValueError, match="inner_norm weight must have shape"):
        call(inner_norm_weight=parts["inner_norm_weight"][1:])
    with pytest.raises(ValueError, match="inner_norm must be a \\(weight, bias\\) pair"):
        call(inner_norm_bias=None)
    xo, wo, _, _ = make_inputs(2, 9, 32, [16, 5, 12], v_dims, dtype=torch.float32)
    with pytest.raises(ValueError, match="every q/k width must be even"):
        ops.attention_block(xo, *wo, [16, 5, 12], v_dims, 0.25, rope_cos=parts["rope_cos"][:, :33],
                            rope_sin=parts["rope_sin"][:, :33], rope_index=parts["rope_index"])


def test_cpp_checks_name_the_eva_parts():
    x, w, g, kb, qk_dims, v_dims, parts = eva_inputs()
    extras = list(schema_extras(parts))
    extras[4] = extras[4][:, 1:]
    with pytest.raises(RuntimeError, match="rope_cos and rope_sin must be float tables"):
        torch.ops.dcvit.attention_block(x, *w, qk_dims, v_dims, 0.25, 1e-6, g, kb, *extras)
    extras = list(schema_extras(parts))
    extras[8] = None
    with pytest.raises(RuntimeError, match="inner_norm_weight and inner_norm_bias"):
        torch.ops.dcvit.attention_block(x, *w, qk_dims, v_dims, 0.25, 1e-6, g, kb, *extras)
