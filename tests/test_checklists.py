"""docs/ARCHITECTURE.md's checklists, followed literally by a newcomer's code: a Triton-only
op and a training-free method, each written into a temporary folder and registered only as
the checklist says (define_op for the op; the module beside the methods and one METHODS line
for the method), then run through `dcvit doctor`, `dcvit compress` and `dcvit plan`. The
refusals at registration (a taken name, a schema that is not the reference's signature, one
option name with two types) are checked here too."""
import importlib
import json
import sys

import pytest
import torch

import dcvit_engine.compress as compress_package
from dcvit_engine.cli import main
from dcvit_engine.compress import api
from dcvit_engine.ops import OPS
from dcvit_engine.ops.define import OpDef, define_op

# The op checklist's first two files (kernels/rowscale.py, ops/rowscale.py) as a newcomer
# writes them: a reference, a Triton kernel with its launcher, the check, the example, and
# define_op with backends=("torch", "triton") -- no C++.
TOY_KERNELS = '''
import torch
import triton
import triton.language as tl


def rowscale_ref(x, weight, shift=0.0):
    return x * weight + shift


@triton.jit
def _rowscale_kernel(x_ptr, w_ptr, out_ptr, rows, cols, shift, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    x = tl.load(x_ptr + row * cols + offs, mask=mask).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + row * cols + offs, (x * w + shift).to(out_ptr.dtype.element_ty), mask=mask)


def rowscale_triton(x, weight, shift=0.0, *, out=None, launch=None):
    launch = launch or (lambda kernel: kernel)
    x = x.contiguous()
    out = torch.empty_like(x) if out is None else out
    cols = x.shape[-1]
    launch(_rowscale_kernel)[(x.numel() // cols,)](x, weight.contiguous(), out, x.numel() // cols, cols,
                                                   shift, BLOCK=triton.next_power_of_2(cols))
    return out
'''

TOY_OP = '''
import torch

from dcvit_engine.ops.checks import check_like_x
from dcvit_engine.ops.define import OpDef, define_op
from toy_kernels import rowscale_ref, rowscale_triton


def _check(x, weight, shift):
    if x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"{NAME}: x must be a floating-point (..., D) tensor")
    check_like_x(NAME, x, {"weight": (weight, (x.shape[-1],))})


def _example(generator):
    return (torch.randn(3, 37, generator=generator, dtype=torch.float64),
            torch.randn(37, generator=generator, dtype=torch.float64), 0.5), {}


NAME = "toy_rowscale"
ROWSCALE = define_op(OpDef(
    name=NAME, schema="(Tensor x, Tensor weight, float shift=0.0) -> Tensor",
    backends=("torch", "triton"), reference=rowscale_ref, triton=rowscale_triton,
    fake=lambda x, weight, shift=0.0: torch.empty_like(x), check=_check, example=_example,
))
toy_rowscale = ROWSCALE.function
toy_rowscale_backends = ROWSCALE.backends_function
'''

# The method checklist's module (dcvit_engine/compress/toymag.py): training-free magnitude
# pruning of MLP neurons with the shared pieces (importance scores, slicing, the run
# scaffold, the Plan base), and a plan function for `dcvit plan`.
TOY_METHOD = '''
from dataclasses import dataclass

import torch

from dcvit_engine.macs import count_macs
from dcvit_engine.compress.importance import neuron_scores
from dcvit_engine.compress.options import CliOption
from dcvit_engine.compress.run import MethodRun
from dcvit_engine.compress.slicing import BlockMasks, slice_model, width_costs
from dcvit_engine.compress.structure import Plan, check_target_ratio

CLI_OPTIONS = {"min_hidden": CliOption("MLP neurons every block keeps at least")}


@dataclass(frozen=True)
class ToyMagPlan(Plan):
    target_ratio: float
    teacher_macs: int
    target_macs: int
    macs: int
    hidden: tuple

    method = "toymag"

    def summary(self):
        return f"keep MLP hidden widths {list(self.hidden)}: {self.macs} MACs of {self.teacher_macs}"


def plan_toymag(spec, target_macs, *, min_hidden: int = 1):
    ratio = check_target_ratio(target_macs)
    costs, teacher = width_costs(spec), count_macs(spec).total
    budget = ratio * teacher - costs.total([b.attn.qk_total for b in spec.blocks],
                                           [b.attn.v_total for b in spec.blocks], [0] * spec.depth)
    full = sum(c * b.mlp_hidden for c, b in zip(costs.neuron, spec.blocks))
    share = min(1.0, max(0.0, budget / full))
    hidden = tuple(max(min_hidden, int(share * b.mlp_hidden)) for b in spec.blocks)
    macs = costs.total([b.attn.qk_total for b in spec.blocks], [b.attn.v_total for b in spec.blocks], hidden)
    return ToyMagPlan(ratio, teacher, round(ratio * teacher), int(macs), hidden)


def compress_toymag(model, images=None, target_macs=0.8, *, min_hidden: int = 1, report=None):
    run = MethodRun("toymag", model, images, target_macs, images_required=False, head_required=False,
                    move=False, settings=dict(min_hidden=min_hidden))
    plan = plan_toymag(run.spec, target_macs, min_hidden=min_hidden)
    masks = []
    for scores, keep in zip(neuron_scores(run.teacher), plan.hidden):
        hidden = torch.zeros_like(scores)
        hidden[scores.argsort(descending=True)[:keep]] = 1.0
        masks.append(BlockMasks(hidden=hidden))
    return run.finish(slice_model(run.teacher, masks), report, extras=dict(plan=plan.to_dict()))
'''

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 3, "num_heads": 3, "num_classes": 10}
MODEL = ["--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(TINY_VIT)]


@pytest.fixture
def newcomer(tmp_path, monkeypatch):
    """The toy op and method, registered the documented way; unregistered afterwards."""
    (tmp_path / "toy_kernels.py").write_text(TOY_KERNELS)
    (tmp_path / "toy_op.py").write_text(TOY_OP)
    methods = tmp_path / "methods"
    methods.mkdir()
    (methods / "toymag.py").write_text(TOY_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    # the method module as if it were dcvit_engine/compress/toymag.py, and its METHODS line
    monkeypatch.setattr(compress_package, "__path__", [*compress_package.__path__, str(methods)])
    monkeypatch.setitem(api.METHODS, "toymag", api.Method("magnitude-prune MLP neurons (a toy)",
                                                          plan="plan_toymag", uses_images=False))
    try:
        op_module = importlib.import_module("toy_op")
        yield op_module
    finally:
        OPS.pop("toy_rowscale", None)
        for name in ("toy_op", "toy_kernels", "dcvit_engine.compress.toymag"):
            sys.modules.pop(name, None)


def test_a_triton_only_op_has_only_its_backends(newcomer):
    x, weight = torch.randn(2, 5, 9), torch.randn(9)
    reasons = newcomer.toy_rowscale_backends(x, weight)
    assert set(reasons) == {"torch", "triton"}  # no cpu/cuda backend, so no "rebuild" advice
    assert OPS["toy_rowscale"].dispatcher.priority == {"cuda": ("triton", "torch"), "cpu": ("torch",)}
    torch.testing.assert_close(newcomer.toy_rowscale(x, weight, shift=1.5), x * weight + 1.5)
    with pytest.raises(ValueError, match="weight must have shape"):
        newcomer.toy_rowscale(x, torch.randn(4))


@pytest.mark.interpreter
def test_a_triton_only_op_runs_its_triton_backend(newcomer):
    x, weight = torch.randn(2, 5, 9), torch.randn(9)
    out = newcomer.toy_rowscale(x, weight, 0.25, backend="triton")
    torch.testing.assert_close(out, x * weight + 0.25)


def test_doctor_checks_the_new_op_on_its_own_backends(newcomer, capsys):
    status = main(["doctor", "--device", "cpu", "--dtype", "fp32"])
    out = capsys.readouterr().out
    assert status == 0, out
    table = out[out.index("\ntoy_rowscale on cpu"):]
    table = table[:table.index("\n\n")] if "\n\n" in table else table
    assert "torch    ok" in table and "triton" in table
    assert "cpu " not in table.split("\n", 1)[1] and "rebuild" not in table
    assert "toy_rowscale" in out[:out.index("\ntoy_rowscale on cpu")]  # its row of the backend order


def test_compress_and_plan_run_a_training_free_method_without_data(newcomer, capsys, tmp_path):
    out_dir = tmp_path / "student"
    status = main(["compress", *MODEL, "--method", "toymag", "--target-macs", "0.8", "--min-hidden", "4",
                   "--out", str(out_dir)])
    out, err = capsys.readouterr()
    assert status == 0, err
    report = json.loads((out_dir / "report.json").read_text())
    assert report["method"] == "toymag" and report["settings"] == {"min_hidden": 4}
    assert report["achieved_ratio"] <= 0.8 + 1e-9 and report["num_images"] == 0
    assert "0 images" in out and "3 blocks, 3 with attention" in out
    status = main(["plan", *MODEL, "--method", "toymag", "--target-macs", "0.8", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert status == 0 and plan["method"] == "toymag" and plan["macs"] == report["achieved_macs"]
    # plan options are the plan function's: an option only compress takes is refused by name
    assert main(["plan", *MODEL, "--method", "dcvit", "--target-macs", "0.8", "--min-hidden", "4"]) == 2
    assert "--min-hidden do(es) not apply to --method dcvit" in capsys.readouterr().err


def test_compress_tome_runs_without_data_and_a_method_with_images_asks_for_them(capsys, tmp_path):
    status = main(["compress", *MODEL, "--method", "tome", "--target-macs", "0.8",
                   "--out", str(tmp_path / "tome")])
    assert status == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "tome" / "report.json").read_text())["method"] == "tome"
    capsys.readouterr()
    status = main(["compress", *MODEL, "--method", "dcvit", "--target-macs", "0.8",
                   "--out", str(tmp_path / "dcvit")])
    assert status == 2 and "--method dcvit needs --data and --num-samples" in capsys.readouterr().err
    assert not (tmp_path / "dcvit").exists()


def _toy_definition(name, schema="(Tensor x) -> Tensor"):
    def toy_ref(x):
        return x.clone()
    return OpDef(name=name, schema=schema, backends=("torch",), reference=toy_ref, fake=toy_ref)


def test_registering_a_taken_name_or_a_wrong_schema_fails_naming_both():
    with pytest.raises(ValueError, match=r"'mlp_block' is defined twice: in dcvit_engine.ops.mlp_block "
                                         r"and in (tests\.)?test_checklists"):
        define_op(_toy_definition("mlp_block"))
    with pytest.raises(ValueError, match=r"the schema's arguments are \['x', 'y'\], the reference's \['x'\] "
                                         r"\(.*toy_ref\)"):
        define_op(_toy_definition("toy_wrong_schema", "(Tensor x, Tensor y) -> Tensor"))
    assert "toy_wrong_schema" not in OPS


def test_one_option_name_with_two_types_fails_naming_both_methods(monkeypatch):
    from dcvit_engine.cli.method_args import method_flags

    defaults = {"dcvit": {"iters": 100}, "uvc": {"iters": 0.5}}
    with pytest.raises(TypeError, match=r"'iters' is int in dcvit_engine.compress.dcvit.compress_dcvit .* "
                                        r"float in dcvit_engine.compress.uvc.compress_uvc"):
        method_flags(("dcvit", "uvc"), ("iters",), defaults_of=lambda m: defaults[m])
