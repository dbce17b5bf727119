"""Backend choice: priority, explicit requests, the environment override, reasons; the
op definitions: one schema per op, the same as the compiled library's, and one Triton op
derived from it."""
import pytest
import torch

from dcvit_engine import _native, ops
from dcvit_engine.ops.define import schema_arguments
from dcvit_engine.ops.dispatch import ENV_VAR, PRIORITY, Impl, OpDispatcher

TOY_PRIORITY = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


def _inputs():
    dim, hidden = 16, 7
    x = torch.randn(1, 3, dim)
    return x, [torch.randn(dim), torch.randn(dim), torch.randn(hidden, dim), torch.randn(hidden),
               torch.randn(dim, hidden), torch.randn(dim)]


def _tagging_dispatcher(refuse=()):
    """A dispatcher whose backends return their own name, some refusing."""
    impls = [Impl(name, (lambda n: lambda *a: f"{n} refuses" if n in refuse else None)(name),
                  (lambda n: lambda *a: n)(name)) for name in ("torch", "cpu", "cuda", "triton")]
    return OpDispatcher("toy", impls, priority=TOY_PRIORITY)


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


def test_a_refusal_describes_the_inputs():
    x, w = _inputs()
    with pytest.raises(ops.BackendUnavailableError) as info:
        ops.mlp_block(x.double(), *(t.double() for t in w), backend="cpu")
    message = str(info.value)
    assert "cpu: dtype torch.float64 not supported" in message and "torch: available" in message
    assert "x: (1, 3, 16) float64 on cpu" in message
    assert "fc1_weight: (7, 16) float64 on cpu" in message and "eps: 1e-06" in message


@pytest.mark.skipif(_native.LOAD_ERROR is not None, reason="dcvit_engine._C is not loaded")
def test_each_op_has_one_schema_the_same_in_cpp_and_python():
    for name, op in ops.OPS.items():
        native = getattr(torch.ops.dcvit, name).default._schema
        assert [a.name for a in native.arguments] == op.arguments, name
        assert str(native) == f"dcvit::{name}{op.spec.schema}", name
        triton = getattr(torch.ops.dcvit, f"_triton_{name}").default._schema
        # the Triton op: the public schema plus its optional hints, nothing else
        assert [a.name for a in triton.arguments][:len(op.arguments)] == op.arguments, name
        assert all(a.default_value is None for a in triton.arguments[len(op.arguments):])
        assert not hasattr(torch.ops.dcvit, f"{name}_triton"), "no second public op"
    assert set(ops.OPS) == set(PRIORITY)


def test_ops_take_backend_by_keyword_only():
    import inspect
    for fn in (ops.mlp_block, ops.attention_block, ops.tome_merge, ops.atme_merge, ops.atme_unmerge):
        assert inspect.signature(fn).parameters["backend"].kind is inspect.Parameter.KEYWORD_ONLY


def test_schema_arguments():
    assert schema_arguments("(Tensor x, int[] dims, float eps=1e-6) -> Tensor") == ["x", "dims", "eps"]
