"""Backend choice: priority, explicit requests, the environment override, reasons."""
import pytest
import torch

from dcvit_engine import ops
from dcvit_engine.ops.dispatch import ENV_VAR, Impl, OpDispatcher


def _inputs():
    dim, hidden = 16, 7
    x = torch.randn(1, 3, dim)
    return x, [torch.randn(dim), torch.randn(dim), torch.randn(hidden, dim), torch.randn(hidden),
               torch.randn(dim, hidden), torch.randn(dim)]


def _tagging_dispatcher(refuse=()):
    """A dispatcher whose backends return their own name, some refusing."""
    impls = [Impl(name, (lambda n: lambda *a: f"{n} refuses" if n in refuse else None)(name),
                  (lambda n: lambda *a: n)(name)) for name in ("torch", "cpu", "cuda", "triton")]
    return OpDispatcher("toy", impls)


def test_priority_on_cpu_picks_cpu_then_torch():
    x = torch.zeros(1)
    assert _tagging_dispatcher()(x.device, x) == "cpu"
    assert _tagging_dispatcher(refuse={"cpu"})(x.device, x) == "torch"


def test_priority_on_cuda_device_type():
    assert _tagging_dispatcher()(torch.device("cuda"), None) == "cuda"
    assert _tagging_dispatcher(refuse={"cuda"})(torch.device("cuda"), None) == "triton"


def test_explicit_request_is_honoured_or_refused_with_every_reason():
    x = torch.zeros(1)
    assert _tagging_dispatcher()(x.device, x, backend="triton") == "triton"
    with pytest.raises(ops.BackendUnavailableError) as info:
        _tagging_dispatcher(refuse={"cuda"})(x.device, x, backend="cuda")
    message = str(info.value)
    assert "cuda refuses" in message and "torch: available" in message and ENV_VAR in message


def test_environment_override(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.setenv(ENV_VAR, "torch")
    assert _tagging_dispatcher()(x.device, x) == "torch"
    assert _tagging_dispatcher()(x.device, x, backend="cpu") == "cpu"  # the argument wins
    monkeypatch.setenv(ENV_VAR, "auto")
    assert _tagging_dispatcher()(x.device, x) == "cpu"
    monkeypatch.setenv(ENV_VAR, "tpu")
    with pytest.raises(ValueError, match="not a backend"):
        _tagging_dispatcher()(x.device, x)


def test_real_op_reasons_on_cpu():
    x, w = _inputs()
    reasons = ops.mlp_block_backends(x, *w)
    assert reasons["torch"] is None and reasons["cpu"] is None
    assert "not a CUDA device" in reasons["cuda"]
    with pytest.raises(ops.BackendUnavailableError, match="cuda"):
        ops.mlp_block(x, *w, backend="cuda")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    x, w = _inputs()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = ops.mlp_block_backends(x, *w)["triton"]
    assert "TRITON_INTERPRET=1" in reason
