"""What the engine prepares for the GPU ops: the run dtype it picks on CUDA and the
LayerNorm affines folded once into fc1/qkv (runnable without a GPU)."""
import importlib
import warnings

import torch

from conftest import requires_interpreter
from dcvit_engine.dtypes import default_dtype
from dcvit_engine.engine import build_engine
from dcvit_engine.kernels.fused_linear import fold_layer_norm
from dcvit_engine.kernels.head_padding import HEAD_WIDTH_MULTIPLE as HIDDEN_MULTIPLE
from dcvit_engine.ops.dispatch import PRIORITY, OpDispatcher, triton_gemm_why_not
from dcvit_engine.reference import ViTReference
from test_engine import compressed_spec, randomize


class _FakeTensor:
    """Just the device and dtype a backend's refusal reads (no CUDA device here)."""

    def __init__(self, device, dtype):
        self.device, self.dtype = torch.device(device), dtype


def test_cuda_defaults_to_bf16_and_says_so():
    dtype, note = default_dtype(torch.float32, torch.device("cuda", 0))
    assert dtype == torch.bfloat16 and "bfloat16" in note and "float32" in note
    assert default_dtype(torch.float16, torch.device("cuda", 0)) == (torch.float16, None)
    assert default_dtype(torch.float32, torch.device("cpu")) == (torch.float32, None)


def test_cpu_build_keeps_the_model_dtype_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = build_engine(randomize(ViTReference(compressed_spec())), backend="cpu")
    assert engine.dtype == torch.float32


def test_fp32_on_cuda_is_refused_by_triton_gemms():
    assert "fp32 on CUDA" in triton_gemm_why_not([_FakeTensor("cuda", torch.float32)])
    for dtype in (torch.bfloat16, torch.float16):
        assert triton_gemm_why_not([_FakeTensor("cuda", dtype)]) is None


def test_gpu_priority_comes_from_the_one_table():
    op_module = importlib.import_module("dcvit_engine.ops.mlp_block")
    assert OpDispatcher("mlp_block", []).priority is PRIORITY["mlp_block"]
    assert PRIORITY["mlp_block"]["cuda"][0] == "triton"
    assert op_module.MLP_BLOCK.dispatcher.priority is PRIORITY["mlp_block"]


def test_no_folded_copies_on_the_cpu_backend():
    engine = build_engine(randomize(ViTReference(compressed_spec())), backend="cpu")
    assert all(b.fc1_folded is None and b.qkv_folded is None for b in engine.blocks)
    assert not any("folded" in key for key in engine.state_dict())


@requires_interpreter
def test_folded_weights_follow_a_dtype_change():
    engine = build_engine(randomize(ViTReference(compressed_spec())), backend="triton")
    block = next(b for b in engine.blocks if b.has_mlp)
    assert block.fc1_folded.weight.dtype == torch.float32
    engine = engine.to(torch.bfloat16)
    expected = fold_layer_norm(block.norm2_weight, block.norm2_bias, block.fc1_weight, block.fc1_bias)
    for got, want in zip(block.fc1_folded, expected):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@requires_interpreter
def test_triton_engine_passes_its_folded_weights(monkeypatch):
    op_module = importlib.import_module("dcvit_engine.ops.mlp_block")
    engine = build_engine(randomize(ViTReference(compressed_spec())), backend="triton")
    seen = []
    original = op_module.MLP_BLOCK.triton_launcher

    def recording(*args, fc1_folded=None, **kwargs):
        seen.append(fc1_folded)
        return original(*args, fc1_folded=fc1_folded, **kwargs)

    monkeypatch.setattr(op_module.MLP_BLOCK, "triton_launcher", recording)
    engine(torch.randn(1, engine.spec.in_chans, *engine.spec.img_size))
    folded = [b.fc1_folded for b in engine.blocks if b.has_mlp]
    assert len(seen) == len(folded) and all(s.weight is f.weight for s, f in zip(seen, folded))


def test_triton_engine_pads_mlp_hidden_invisibly():
    spec = compressed_spec()
    engine = build_engine(randomize(ViTReference(spec)), backend="triton")
    for block, block_spec in zip(engine.blocks, spec.blocks):
        if block.has_mlp:
            assert block.fc1_weight.shape[0] % HIDDEN_MULTIPLE == 0
            assert block.fc2_weight.shape[1] == block.fc1_weight.shape[0]
            assert f"mlp {block_spec.mlp_hidden}" in block.extra_repr()
    assert any(b.mlp_hidden % HIDDEN_MULTIPLE for b in spec.blocks if b.mlp_hidden), \
        "the spec should have a hidden width that needs padding"
    widths = [b.fc1_weight.shape[0] for b in engine.blocks if b.has_mlp]
    engine.to(torch.bfloat16)  # moving re-pads: padding must be idempotent
    assert [b.fc1_weight.shape[0] for b in engine.blocks if b.has_mlp] == widths


def test_every_op_has_an_order_of_its_own_backends():
    ops = importlib.import_module("dcvit_engine.ops").OPS
    assert set(PRIORITY) <= set(ops)  # a row for an op that does not exist is a typo
    for name, op in ops.items():
        row = op.dispatcher.priority
        assert row is PRIORITY.get(name, row)
        assert set(row) == {"cuda", "cpu"} and row["cpu"][-1] == "torch", name
        assert all(set(order) <= set(op.backends) for order in row.values()), name
