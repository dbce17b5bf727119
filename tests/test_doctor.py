"""`dcvit doctor`: prints the one priority table and checks every op on every backend that
runs here against the float64 reference; a wrong or failing backend makes it exit 1."""
import pytest
import torch

from dcvit_engine.cli import main
from dcvit_engine.ops import OPS
from dcvit_engine.ops.dispatch import Impl


def _checks(backend):
    # one check table per op and per variant of it (OpDef.variants), for the ops that
    # declare `backend`
    return sum(1 + len(op.definition.variants) for op in OPS.values() if backend in op.backends)


def _doctor(capsys, *extra):
    status = main(["doctor", "--device", "cpu", "--dtype", "fp32", *extra])
    return status, capsys.readouterr().out


def test_doctor_checks_every_op_and_exits_zero(capsys):
    status, out = _doctor(capsys)
    assert status == 0, out
    assert "every available backend matches the reference" in out
    for name, op in OPS.items():
        assert f"\n{name} on cpu, float32" in out  # the op's check table
        assert "cuda: " + " > ".join(op.dispatcher.priority["cuda"]) in out  # its priority row
    assert out.count("  cpu      ok ") == _checks("cpu")


def test_doctor_says_what_was_compiled_and_why_auto_picks(capsys):
    from dcvit_engine import _native

    archs = _native.compiled_cuda_archs()
    status, out = _doctor(capsys)
    assert status == 0, out
    assert "C++ CPU kernels: built" in out
    assert archs is not None  # this build records its CUDA archs ([] without CUDA kernels)
    if archs:
        assert "CUDA kernels: " + ", ".join(archs) in out and all(a.startswith("sm_") for a in archs)
    else:
        assert "CUDA kernels: not built" in out
    assert "auto picks cpu: the first of the order above that takes these inputs" in out


def _replace_cpu_impl(monkeypatch, op, run):
    impl = op.dispatcher.impls["cpu"]
    monkeypatch.setitem(op.dispatcher.impls, "cpu", Impl("cpu", impl.why_not, run))


def test_a_wrong_backend_makes_doctor_fail(capsys, monkeypatch):
    op = OPS["mlp_block"]
    right = op.dispatcher.impls["cpu"].run

    def off_by_a_little(*args, **options):
        out = right(*args, **options)
        return out + 1e-3 * out.abs().mean()

    _replace_cpu_impl(monkeypatch, op, off_by_a_little)
    status, out = _doctor(capsys)
    assert status == 1
    # wrong on the op's example and on each of its variants
    assert "  cpu      WRONG" in out and f"{1 + len(op.definition.variants)} wrong or failing" in out


def test_a_failing_backend_makes_doctor_fail(capsys, monkeypatch):
    def broken(*args, **options):
        raise RuntimeError("kernel exploded")

    _replace_cpu_impl(monkeypatch, OPS["atme_unmerge"], broken)
    status, out = _doctor(capsys)
    assert status == 1 and "FAILED   RuntimeError: kernel exploded" in out


def test_an_unwritten_output_makes_doctor_fail(capsys, monkeypatch):
    op = OPS["tome_merge"]
    right = op.dispatcher.impls["cpu"].run

    def nan_size(*args, **options):
        out, size = right(*args, **options)
        return out, torch.full_like(size, float("nan"))

    _replace_cpu_impl(monkeypatch, op, nan_size)
    status, out = _doctor(capsys)
    assert status == 1 and "  cpu      WRONG" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_doctor_refuses_a_missing_cuda_device_in_one_line(capsys):
    status = main(["doctor", "--device", "cuda"])
    out = capsys.readouterr().out.strip().splitlines()
    assert status == 2
    assert out == ["dcvit doctor: device cuda was asked for but CUDA is not available here; use the CPU "
                   "(--device cpu, device='cpu')"]


def test_doctor_without_the_interpreter_says_why_triton_is_off(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    status, out = _doctor(capsys)
    assert status == 0
    assert out.count("triton   off      CPU tensors need TRITON_INTERPRET=1") == _checks("triton")


def test_doctor_checks_the_dtypes_asked_for(capsys):
    assert main(["doctor", "--device", "cpu"]) == 0  # default on the CPU: fp32 only
    out = capsys.readouterr().out
    assert "mlp_block on cpu, float32" in out and "bfloat16" not in out
    status, out = _doctor(capsys, "--dtype", "bf16")  # a later --dtype wins over _doctor's fp32
    assert status == 0 and "mlp_block on cpu, bfloat16" in out and "on cpu, float32" not in out
