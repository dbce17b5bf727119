"""The cpu backend's oneDNN path (csrc/cpu_linear.h): its linears run as mkldnn fused ops
(bias, GELU and residual in the matmul epilogue), several row chunks stay exact against the
float64 reference, weights packed once follow in-place changes and new tensors, and the CLI's dtype
default on CPUs with native bf16."""
import pytest
import torch

from dcvit_engine import ops
from dcvit_engine.dtypes import command_dtype
from dcvit_engine.kernels.mlp_block import mlp_block_ref
from numerics import assert_close_to_reference
from test_mlp_block import make_inputs

MKLDNN = torch.backends.mkldnn.is_available()
BF16_FUSED = MKLDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()
FUSED_DTYPES = [torch.float32] + ([torch.bfloat16] if BF16_FUSED else [])


def op_names(fn) -> set[str]:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {event.key for event in prof.key_averages()}


@pytest.mark.skipif(not MKLDNN, reason="torch built without oneDNN: the cpu backend keeps addmm")
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("layer_scale", [False, True])
def test_mlp_block_runs_fused_onednn_linears(dtype, layer_scale):
    x, w, g = make_inputs(1, 37, 64, 96, layer_scale, dtype=dtype)
    names = op_names(lambda: ops.mlp_block(x, *w, gamma=g, backend="cpu"))
    assert "mkldnn::_linear_pointwise" in names
    # GELU and (without LayerScale) the residual add are epilogues, not passes of their own
    assert not {"aten::gelu", "aten::gelu_", "aten::addmm"} & names
    assert ("aten::add" in names) == layer_scale


@pytest.mark.skipif(not MKLDNN, reason="torch built without oneDNN: the cpu backend keeps addmm")
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
def test_attention_block_runs_fused_onednn_linears(dtype):
    torch.manual_seed(0)
    dim, heads, width = 64, 2, 16
    x = torch.randn(2, 11, dim, dtype=dtype)
    qkv_w = torch.randn(3 * heads * width, dim, dtype=dtype) / dim**0.5
    proj_w = torch.randn(dim, heads * width, dtype=dtype) / (heads * width)**0.5
    args = (x, torch.ones(dim, dtype=dtype), torch.zeros(dim, dtype=dtype), qkv_w,
            torch.zeros(3 * heads * width, dtype=dtype), proj_w, torch.zeros(dim, dtype=dtype),
            [width] * heads, [width] * heads, width**-0.5)
    names = op_names(lambda: ops.attention_block(*args, backend="cpu"))
    assert "mkldnn::_linear_pointwise" in names
    assert not {"aten::addmm", "aten::add"} & names  # proj's bias + residual in its epilogue


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layer_scale", [False, True])
def test_mlp_block_several_row_chunks(dtype, layer_scale):
    # 3 x 2777 = 8331 rows: one full chunk of 8192 (fused path) and a tail of 139; 33 chunks
    # of 256 and a tail of 139 on the addmm path (fp16)
    torch.manual_seed(1)
    x64, w64, g64 = make_inputs(3, 2777, 24, 40, layer_scale)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    x, w, g = cast(x64), [cast(t) for t in w64], cast(g64)
    out = ops.mlp_block(x, *w, gamma=g, backend="cpu")
    assert_close_to_reference(out, mlp_block_ref(x64, *w64, gamma=g64), mlp_block_ref(x, *w, gamma=g),
                              what=f"cpu {dtype} 8331 rows")


@pytest.mark.skipif(not MKLDNN, reason="torch built without oneDNN: the cpu backend keeps addmm")
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
def test_packed_weights_follow_their_tensors(dtype):
    # cpu_linear.cpp packs each weight tensor once: an in-place change of the weight, and a new
    # weight tensor (which may reuse the old one's memory), must each give their own result
    torch.manual_seed(2)
    x64, w64, g64 = make_inputs(2, 19, 32, 48, True)
    cast = lambda t: t.to(dtype)  # noqa: E731
    x, w, g = cast(x64), [cast(t) for t in w64], cast(g64)
    ops.mlp_block(x, *w, gamma=g, backend="cpu")  # packs fc1 and fc2
    for step in range(3):
        if step == 1:
            w64[2].mul_(-0.5)
            w[2].copy_(w64[2])  # in place: same tensor, new version
        if step == 2:
            w64[4] = torch.randn_like(w64[4]) / 48**0.5
            w[4] = cast(w64[4])  # a new tensor
        out = ops.mlp_block(x, *w, gamma=g, backend="cpu")
        assert_close_to_reference(out, mlp_block_ref(x64, *w64, gamma=g64), mlp_block_ref(x, *w, gamma=g),
                                  what=f"cpu {dtype} step {step}")


def test_command_dtype_default(monkeypatch):
    import dcvit_engine.dtypes as dtypes_module

    cpu = torch.device("cpu")
    assert command_dtype("fp32", cpu) == (torch.float32, None)
    assert command_dtype("bf16", cpu) == (torch.bfloat16, None)
    assert command_dtype(None, torch.device("cuda")) == (torch.bfloat16, None)
    monkeypatch.setattr(dtypes_module, "cpu_has_native_bf16", lambda: True)
    dtype, note = command_dtype(None, cpu)
    assert dtype == torch.bfloat16 and "bfloat16" in note and "--dtype fp32" in note
    monkeypatch.setattr(dtypes_module, "cpu_has_native_bf16", lambda: False)
    assert command_dtype(None, cpu) == (torch.float32, None)
    with pytest.raises(ValueError, match="unknown dtype"):
        command_dtype("float8", cpu)
