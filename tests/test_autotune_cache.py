"""kernels/autotune_cache.py: the GEMM autotuner's keys (M bucketed) and its results kept
across processes, counted with fake launches on the CPU: the real launchers run on fake CUDA
tensors, Triton's own Autotuner.run picks the key and asks the table, and only the
benchmark and the kernel launch are replaced."""
import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.runtime.autotuner import Autotuner

from dcvit_engine.kernels import attention as attention_kernels
from dcvit_engine.kernels import fused_linear
from dcvit_engine.kernels.autotune_cache import TuningTable, m_bucket
from dcvit_engine.kernels.merge_rules import tome_effective_r
from dcvit_engine.kernels.mlp_block import mlp_block_triton

# DeiT-B: 197 tokens (class token + 14 x 14), width 768, 12 heads of 64, MLP 3072, 12 blocks
TOKENS, DIM, HEADS, HIDDEN, BLOCKS = 197, 768, 12, 3072, 12


def tome_schedule(r=13):
    """(tokens entering, tokens after the merge) per block of a constant-r ToMe DeiT-B."""
    schedule, tokens = [], TOKENS
    for _ in range(BLOCKS):
        leaving = tokens - tome_effective_r(tokens, r, class_token=True, distill_token=False)
        schedule.append((tokens, leaving))
        tokens = leaving
    return schedule


def test_m_bucket_is_the_largest_power_of_8_not_above_m():
    assert [m_bucket(m) for m in (0, 1, 7, 8, 63, 64, 511, 512, 50432)] == [1, 1, 1, 8, 8, 64, 64, 512, 32768]


class _FakeGpu:
    """The GEMM tuners with a counting benchmark, no kernel launch and a fresh table for a
    fake GPU; every other kernel launch is a no-op."""

    def __init__(self, monkeypatch, device="Fake GPU 80GB"):
        self.benchmarked = []  # (kernel, exact key) per tuning
        self.tuners = list(fused_linear._TUNED.values())
        for tuner in self.tuners:
            def bench(*args, config, tuner=tuner, **meta):
                return [1.0 + tuner.configs.index(config), 0.0, 0.0]  # the first config wins
            monkeypatch.setattr(tuner, "_bench", bench)
            monkeypatch.setattr(tuner, "fn", types.SimpleNamespace(run=lambda *a, **k: None))
            monkeypatch.setattr(tuner, "cache", TuningTable(tuner, device_name=lambda: device))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)

    def keys(self):
        return sum(len(tuner.cache) for tuner in self.tuners)

    @staticmethod
    def launch(kernel):
        # the tuners run (their Autotuner.run picks the key); other kernels launch nothing
        return kernel if isinstance(kernel, Autotuner) else _NoLaunch()


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _tome_deit_b_forward(batch, launch):
    """The Triton launches of a ToMe (r=13) DeiT-B forward at `batch`: per block the attention
    block (qkv, flash core, proj) at the entering token count, the MLP block (fc1, fc2) after
    the merge."""
    def t(*shape):
        return torch.empty(*shape, dtype=torch.bfloat16, device="cuda")

    heads = [64] * HEADS
    with FakeTensorMode(allow_non_fake_inputs=True):
        for entering, leaving in tome_schedule():
            attention_kernels.attention_block_triton(
                t(batch, entering, DIM), t(DIM), t(DIM), t(3 * DIM, DIM), t(3 * DIM), t(DIM, DIM), t(DIM),
                heads, heads, 0.125, gamma=t(DIM), key_bias=t(batch, entering), launch=launch)
            mlp_block_triton(t(batch, leaving, DIM), t(DIM), t(DIM), t(HIDDEN, DIM), t(HIDDEN),
                             t(DIM, HIDDEN), t(DIM), gamma=t(DIM), launch=launch)


def test_a_tome_deit_b_model_tunes_at_most_8_keys_per_new_batch_size(monkeypatch, tmp_path):
    monkeypatch.setenv("DCVIT_CACHE", str(tmp_path))
    gpu = _FakeGpu(monkeypatch)
    exact = set()
    for batch in (1, 8, 64, 256, 255, 100):
        before = gpu.keys()
        _tome_deit_b_forward(batch, gpu.launch)
        added = gpu.keys() - before
        assert added <= 8, f"batch {batch}: {added} new autotune keys"
        exact |= {batch * n for step in tome_schedule() for n in step}
    # what an exact-M key would have tuned: every token count of every batch size
    assert len(exact) > 8 * 6
    # a batch size whose M values all fall in buckets seen before tunes nothing new
    before = gpu.keys()
    _tome_deit_b_forward(255, gpu.launch)
    assert gpu.keys() == before


def test_picks_are_read_back_by_a_new_process_and_kept_apart_per_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("DCVIT_CACHE", str(tmp_path))
    first = _FakeGpu(monkeypatch)
    _tome_deit_b_forward(64, first.launch)
    tuned = first.keys()
    assert tuned > 0 and any(p.name.startswith("autotune-") for p in (tmp_path / "autotune").iterdir())

    # a new process: fresh tables reading the same folder; nothing is benchmarked again
    again = _FakeGpu(monkeypatch)
    calls = []
    for tuner in again.tuners:
        monkeypatch.setattr(tuner, "_bench", lambda *a, **k: calls.append(1) or [1.0, 0.0, 0.0])
    _tome_deit_b_forward(64, again.launch)
    assert calls == [] and again.keys() == tuned

    # another GPU model gets its own file: tuned afresh
    other = _FakeGpu(monkeypatch, device="Other GPU")
    _tome_deit_b_forward(64, other.launch)
    assert other.keys() == tuned


def test_a_corrupt_cache_file_is_tuned_again_not_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("DCVIT_CACHE", str(tmp_path))
    gpu = _FakeGpu(monkeypatch)
    _tome_deit_b_forward(8, gpu.launch)
    for path in (tmp_path / "autotune").iterdir():
        path.write_text("{not json")
    fresh = _FakeGpu(monkeypatch)
    _tome_deit_b_forward(8, fresh.launch)
    assert fresh.keys() == gpu.keys()


def test_the_table_needs_m_as_the_first_key():
    tuner = types.SimpleNamespace(keys=["N", "K"])
    with pytest.raises(ValueError, match="must be M"):
        TuningTable(tuner)
