"""The engine on the backbones of issue 19 (registers, RoPE of every timm kind, gated MLPs,
QuickGELU, inner norms, attention-pool heads) against timm's own forward: fp32 and bf16 by
the ops' tolerance rule (timm in float64 the reference, timm in the run dtype setting the
budget), on the fused ops' backends this machine runs."""
import copy

import pytest
import torch

from conftest import requires_interpreter
from dcvit_engine.engine import build_engine
from numerics import assert_close_to_reference
from test_backbones import FAMILY, NAMED, images, randomized, timm_in_float64

MODELS = {**NAMED, **FAMILY}


def check_against_timm(model, backend: str, dtype: torch.dtype, batch: int = 3):
    x = images(model, batch, torch.float64)
    with torch.no_grad():
        ref64 = timm_in_float64(copy.deepcopy(model))(x)
        same_precision = copy.deepcopy(model).to(dtype)(x.to(dtype))
        engine = build_engine(model, backend=backend, dtype=dtype, device="cpu")
        out = engine(x.to(dtype))
    assert out.shape == ref64.shape and out.dtype == dtype
    interpreter_bf16 = backend == "triton" and dtype == torch.bfloat16
    assert_close_to_reference(out.float(), ref64, same_precision.float(), interpreter_bf16=interpreter_bf16,
                              what=f"engine {backend} {dtype}")


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_engine_matches_timm_fp32(name, backend):
    kwargs, _ = MODELS[name]
    check_against_timm(randomized(name, **kwargs), backend, torch.float32)


@pytest.mark.parametrize("name", list(NAMED))
def test_engine_matches_timm_bf16(name):
    kwargs, _ = NAMED[name]
    check_against_timm(randomized(name, **kwargs), "cpu", torch.bfloat16)


@requires_interpreter
@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "vit_small_patch16_dinov3"])
def test_engine_triton_interpreter(name):
    """RoPE (interleaved and half), SwiGLU, registers through the Triton ops, one block."""
    kwargs, _ = MODELS[name]
    check_against_timm(randomized(name, **dict(kwargs, depth=1)), "triton", torch.float32, batch=1)


@pytest.mark.parametrize("name", list(NAMED))
def test_engine_matches_timm_at_full_size(name):
    """Full size, one image, the cpu backend against timm in fp32 (measured 6e-8 .. 6e-7)."""
    model = randomized(name)
    x = images(model, 1)
    with torch.no_grad():
        expected = model(x)
        out = build_engine(model, backend="cpu", dtype=torch.float32, device="cpu")(x)
    err = ((out.double() - expected.double()).norm() / expected.double().norm()).item()
    assert err < 1e-5, err
