"""pytest-benchmark CPU benchmarks of whole models (run: pytest benchmarks/ --benchmark-enable):
DeiT-Tiny through timm eager and the engine, uncompressed and with 4 attention-free blocks;
and checks of bench_models itself (interleaved timing, one short run's table)."""
import csv
import os
import sys

import pytest
import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_models import dcvit_variant, main  # noqa: E402
from dcvit_engine.engine import build_engine  # noqa: E402
from dcvit_engine.reference import ViTReference, reference_from_timm  # noqa: E402
from timing import time_interleaved  # noqa: E402


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


def test_time_interleaved_alternates_runners_and_rotates_the_order():
    calls = []
    runners = {name: (lambda images, name=name: calls.append(name)) for name in "abc"}
    timings = time_interleaved(runners, torch.zeros(3, 1), warmup=1, repeats=3)
    # warm-up once each, then rounds a b c / b c a / c a b
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert set(timings) == set("abc")
    assert all(t.batch_size == 3 and t.repeats == 3 and t.min_ms <= t.median_ms <= t.max_ms
               for t in timings.values())


def test_bench_models_short_cpu_run_writes_every_runner(tmp_path):
    main(["--device", "cpu", "--models", "deit_tiny", "--batch-sizes", "1", "--variants", "1",
          "--no-compile", "--backends", "cpu", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    with open(tmp_path / "models.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["runner"], r["variant"]) for r in rows] == [
        ("timm_eager", "full"), ("engine_cpu", "full"), ("engine_cpu", "N=1")]
    full = rows[1]
    assert float(full["speedup"]) == pytest.approx(1.0)  # the uncompressed model over itself
    variant = rows[2]
    assert float(variant["realized_speedup"]) == pytest.approx(
        float(variant["speedup"]) / float(variant["macs_reduction"]), rel=1e-3)
    assert all(float(r["images_per_s"]) > 0 for r in rows)


@pytest.mark.parametrize("short", ["dinov2_small", "dinov3_small", "eva02_small"])
def test_modern_backbones_have_a_dcvit_student(short):
    # --models takes them at full size; their students (registers, RoPE, SwiGLU, LayerScale
    # kept) are smaller specs that still validate and build
    from bench_models import MODELS
    from dcvit_engine.macs import count_macs
    from dcvit_engine.models import resolve_model

    teacher = resolve_model(model_name=MODELS[short])
    spec, hidden = dcvit_variant(teacher.spec, 2)
    assert sum(b.attn is None for b in spec.blocks) == 2
    assert count_macs(spec).total < count_macs(teacher.spec).total
    assert spec.num_prefix_tokens == teacher.spec.num_prefix_tokens and spec.rope == teacher.spec.rope
    ViTReference(spec)
