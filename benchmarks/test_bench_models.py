"""pytest-benchmark CPU benchmarks of whole models (run: pytest benchmarks/ --benchmark-enable):
DeiT-Tiny through timm eager and the engine, uncompressed and with 4 attention-free blocks."""
import os
import sys

import pytest
import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_models import dcvit_variant  # noqa: E402

from dcvit_engine.engine import build_engine  # noqa: E402
from dcvit_engine.reference import ViTReference, reference_from_timm  # noqa: E402


@pytest.fixture(scope="module")
def deit_tiny():
    return timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 224, 224)


def test_timm_eager(benchmark, deit_tiny, images):
    with torch.no_grad():
        benchmark(deit_tiny, images)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("attention_free_blocks", [0, 4])
def test_engine(benchmark, deit_tiny, images, backend, attention_free_blocks):
    model = reference_from_timm(deit_tiny)
    if attention_free_blocks:
        model = ViTReference(dcvit_variant(model.spec, attention_free_blocks)[0]).eval()
    engine = build_engine(model, backend=backend)
    out = benchmark(engine, images)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
