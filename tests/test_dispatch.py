"""Backend choice: priority, explicit requests, the environment override, reasons; the
op definitions: one schema per op, the same as the compiled library's, and one Triton op
derived from it."""
import pytest
import torch

from dcvit_engine import _native, ops
from dcvit_engine.ops.define import schema_arguments
from dcvit_engine.ops.dispatch import ENV_VAR, Impl, OpDispatcher

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


def _out_schema(name, schema):
    """The `.out` schema csrc/op_schema.h's define_with_out derives from an op's schema."""
    head, _, returns = schema.partition(") -> ")
    count = returns.count("Tensor")
    aliases = "abcdefgh"[:count]
    names = (["out", "key_mean_out"] if name == "attention_block_key_mean" else ["out", "size_out"])[:count]
    outs = ", ".join(f"Tensor({a}!) {n}" for a, n in zip(aliases, names))
    results = ", ".join(f"Tensor({a}!)" for a in aliases)
    return f"dcvit::{name}.out{head}, *, {outs}) -> " + (f"({results})" if count > 1 else results)


@pytest.mark.skipif(_native.LOAD_ERROR is not None, reason="dcvit_engine._C is not loaded")
def test_each_op_has_one_schema_the_same_in_cpp_and_python():
    for name, op in ops.OPS.items():
        schema = op.definition.schema
        if {"cpu", "cuda"} & set(op.backends):
            native = getattr(torch.ops.dcvit, name)
            assert [a.name for a in native.default._schema.arguments] == op.arguments, name
            assert str(native.default._schema) == f"dcvit::{name}{schema}", name
            # define_with_out made `.out` from the same string, and impl_with_out implements it
            assert str(native.out._schema) == _out_schema(name, schema), name
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dcvit::{name}.out", "CPU"), name
        else:
            assert not hasattr(torch.ops.dcvit, name), f"{name} declares no compiled backend"
        if "triton" in op.backends:
            triton = getattr(torch.ops.dcvit, f"_triton_{name}").default._schema
            # the Triton op: the public schema plus its optional hints, nothing else
            assert [a.name for a in triton.arguments][:len(op.arguments)] == op.arguments, name
            assert all(a.default_value is None for a in triton.arguments[len(op.arguments):])
        assert not hasattr(torch.ops.dcvit, f"{name}_triton"), "no second public op"


def test_each_op_offers_only_the_backends_it_declares():
    for name, op in ops.OPS.items():
        assert "torch" in op.backends and set(op.backends) <= set(ops.BACKENDS), name
        assert set(op.dispatcher.impls) == set(op.backends), name
        args, options = op.definition.example(torch.Generator().manual_seed(0))
        assert set(op.reasons(*args, **options)) == set(op.backends), name


def test_ops_take_backend_by_keyword_only():
    import inspect
    for name, op in ops.OPS.items():
        for fn in (op.function, getattr(ops, name, op.function)):
            assert inspect.signature(fn).parameters["backend"].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert "backend" not in inspect.signature(op.backends_function).parameters, name
        assert op.function.__name__ == name and op.backends_function.__name__ == f"{name}_backends"


def test_op_spec_is_the_old_name_of_its_definition():
    op = next(iter(ops.OPS.values()))
    assert op.spec is op.definition


def test_schema_arguments():
    assert schema_arguments("(Tensor x, int[] dims, float eps=1e-6) -> Tensor") == ["x", "dims", "eps"]
