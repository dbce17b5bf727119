"""The cpu backend's bf16 attention cores against the float64 reference, at most FACTOR times
plain PyTorch's bf16 error, each core pinned in turn (DCVIT_CPU_ATTENTION, cpu_attention.h):
this project's kernel (csrc/cpu_attention.cpp, the default on CPUs with AVX512-BF16 and no
AMX; on a CPU without AVX512-BF16 "own" runs ATen's SDPA and checks that instead) and ATen's
SDPA (the default where ATen's brgemm has AMX). Token counts around the kernel's 16-key and
2-key padding, q/k widths from 2 to 80, v widths that are not multiples of 16, several head
groups, key bias with masked (-inf) keys, and the fallback above 1024 tokens."""
import pytest
import torch

from dcvit_engine import ops
from dcvit_engine.kernels.attention import attention_block_ref
from test_attention import ALL_OFF, ALL_ON, PROP_ATTN, assert_branch_close, check_backend, make_inputs


@pytest.fixture(autouse=True, params=["own", "aten"])
def core(request, monkeypatch):
    """Every test once per core: the environment variable is read on each call."""
    monkeypatch.setenv("DCVIT_CPU_ATTENTION", request.param)
    return request.param

# (batch, tokens, dim, qk_dims, v_dims)
SHAPES = [
    (2, 1, 32, [16, 16], [16, 16]),          # one token: softmax over one key
    (3, 2, 32, [2] * 4, [1] * 4),            # narrowest even q/k width, v width 1
    (2, 16, 64, [16] * 4, [15] * 4),         # keys exactly one 16-lane block
    (2, 17, 64, [16] * 4, [17] * 4),         # one key past it, odd key count
    (1, 33, 96, [48, 48], [33, 16]),         # two widths in one group (v padded to 33)
    (2, 197, 384, [64] * 6, [64] * 6),       # DeiT-S
    (1, 197, 160, [80, 80], [80, 96]),       # v wider than one 64-column tile
    (2, 65, 96, [16, 32, 48, 16], [16, 8, 40, 20]),  # three head groups
]


@pytest.mark.parametrize("flags", [ALL_ON, ALL_OFF, PROP_ATTN], ids=["all_on", "all_off", "prop_attn"])
@pytest.mark.parametrize("batch,tokens,dim,qk_dims,v_dims", SHAPES)
def test_bf16_core_against_float64(batch, tokens, dim, qk_dims, v_dims, flags):
    torch.manual_seed(tokens * 31 + dim)
    check_backend("cpu", batch, tokens, dim, qk_dims, v_dims, torch.bfloat16, **flags)


def test_masked_keys_get_no_weight():
    torch.manual_seed(0)
    batch, tokens, dim, qk_dims, v_dims = 2, 37, 64, [32, 32], [32, 32]
    x64, w64, g64, _ = make_inputs(batch, tokens, dim, qk_dims, v_dims)
    bias64 = torch.zeros(batch, tokens, dtype=torch.float64)
    bias64[0, 5:20] = float("-inf")  # keys no query may attend to
    bias64[1, 1:] = float("-inf")    # every query attends to key 0 only
    scale = 64 ** -0.5
    ref64 = attention_block_ref(x64, *w64, qk_dims, v_dims, scale, gamma=g64, key_bias=bias64)
    cast = lambda t: None if t is None else t.to(torch.bfloat16)  # noqa: E731
    x, w, g, kb = cast(x64), [cast(t) for t in w64], cast(g64), cast(bias64)
    same_precision = attention_block_ref(x, *w, qk_dims, v_dims, scale, gamma=g, key_bias=kb)
    out = ops.attention_block(x, *w, qk_dims, v_dims, scale, gamma=g, key_bias=kb, backend="cpu")
    assert_branch_close(out, x, ref64, same_precision, what="masked keys")


def test_long_sequences_fall_back_to_sdpa():
    torch.manual_seed(1)
    check_backend("cpu", 1, 1030, 32, [16, 16], [16, 16], torch.bfloat16, **ALL_ON)

