"""A user's first day, as one test on a tiny model: plan, compress with every method (the
quick preset's plan line first), info, eval, bench, infer, export + onnxruntime, sweep, and
an interrupted compress resumed. Few iterations, fixed seeds, no timing; the interruption is
an exception injected into the run, never a timer."""
import json
import re

import numpy as np
import pytest
import torch

from dcvit_engine import artifact
from dcvit_engine.cli import main
from dcvit_engine.compress.api import METHODS
from dcvit_engine.digits import DIGITS_MEAN, DIGITS_STD, export_digits_folder

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 3, "num_classes": 10}
TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(TINY_VIT)]
NORM = ["--mean", str(DIGITS_MEAN[0]), "--std", str(DIGITS_STD[0])]
FEW = {"dcvit": ["--iters", "2", "--select-iters", "1", "--metric-iters", "2", "--metric-size", "2"],
       "practise": ["--iters", "2", "--adaptor-iters", "1"], "uvc": ["--iters", "2", "--finetune-iters", "1"],
       "cait": ["--iters", "2", "--finetune-iters", "1"], "tome": []}


def dcvit(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return export_digits_folder(tmp_path_factory.mktemp("journey") / "digits", per_class=2)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """The user's trained teacher: a timm checkpoint (here random weights, seeded)."""
    import timm
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT).state_dict(), path)
    return path


def compress_args(digits, method, out, teacher):
    batch = ["--batch-size", "4"] if method != "tome" else []
    return ["compress", *TINY, "--checkpoint", teacher, "--data", digits, "--num-samples", 8,
            "--method", method, "--target-macs", 0.6, *batch, "--device", "cpu", "--seed", 0, *NORM,
            *FEW[method], "--out", out]


def test_first_day(capsys, digits, teacher, tmp_path, monkeypatch):
    rc, out, err = dcvit(capsys, "plan", *TINY, "--method", "dcvit", "--target-macs", 0.6)
    assert rc == 0 and "compress" in out, err

    students = {}
    for method in METHODS:  # every registered method through the same command
        students[method] = tmp_path / method
        preset = ["--preset", "quick"] if method == "dcvit" else []
        rc, out, err = dcvit(capsys, *compress_args(digits, method, students[method], teacher), *preset)
        assert rc == 0, err
        assert (students[method] / "spec.json").is_file() and f"wrote {students[method]}" in out
        plan = next(line for line in out.splitlines() if line.startswith("plan: "))
        assert "no estimate yet" in plan  # nothing was timed before the work started
        if method == "dcvit":  # the quick preset's plan, counted to the end on the overall line
            assert plan.startswith("plan: metric set: 2 DeepInversion steps; scoring 2 candidates x 1: 2 "
                                   "training steps; progressive 2 x 2: 4 training steps (8 steps)")
            assert re.search(r"overall: 8/8 steps \(100%\)", err) and "sized for a GPU" not in out

    student = students["dcvit"]
    rc, out, err = dcvit(capsys, "info", student)
    assert rc == 0 and "MACs" in out, err
    rc, out, err = dcvit(capsys, "eval", student, "--data", digits, "--device", "cpu", "--json", *NORM)
    assert rc == 0, err
    assert json.loads(out)["images"] == 20
    rc, out, err = dcvit(capsys, "bench", student, "--device", "cpu", "--backend", "cpu", "--batch-size", 2,
                         "--warmup", 1, "--repeats", 2)
    assert rc == 0 and "images/s" in out, err
    predictions = tmp_path / "predictions.csv"
    rc, out, err = dcvit(capsys, "infer", student, "--data", digits, "--out", predictions, "--device", "cpu",
                         "--batch-size", 4, "--num-workers", 0, "--no-progress")
    assert rc == 0 and "columns: path:" in out and predictions.is_file(), err

    onnx_file = tmp_path / "student.onnx"
    rc, out, err = dcvit(capsys, "export", student, "--format", "onnx", "--out", onnx_file, "--dynamic-batch")
    assert rc == 0, err
    import onnxruntime
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    with torch.no_grad():
        expected = artifact.load(student)(images).numpy()
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()

    rc, out, err = dcvit(capsys, "sweep", *TINY, "--checkpoint", teacher, "--data", digits,
                         "--num-samples", 8, "--eval-data", digits,
                         "--methods", "practise,tome", "--targets", 0.6, "--iters", 2, "--batch-size", 4,
                         "--metric-iters", 2, "--metric-size", 2, "--no-pair", "--device", "cpu",
                         "--backend", "cpu", *NORM, "--out", tmp_path / "sweep")
    assert rc == 0, err
    assert next(line for line in out.splitlines() if line.startswith("plan: ")).startswith(
        "plan: metric set draw 0: 2 DeepInversion steps; practise 0.6: ")
    assert (tmp_path / "sweep" / "sweep.csv").is_file()

    # interrupted in its first progressive step (Ctrl-C, injected), then resumed: the
    # candidate scores are kept, the run finishes
    from dcvit_engine.compress import dcvit as dcvit_method
    real = dcvit_method.feature_mimic_finetune

    def interrupted(*args, **kwargs):
        if kwargs["iters"] == 2:  # a progressive step (scoring runs 1 iteration)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(dcvit_method, "feature_mimic_finetune", interrupted)
    rc, out, err = dcvit(capsys, *compress_args(digits, "dcvit", resumed, teacher))
    assert rc == 130 and (tmp_path / "resumed.partial" / "state.json").is_file()
    monkeypatch.setattr(dcvit_method, "feature_mimic_finetune", real)
    rc, out, err = dcvit(capsys, *compress_args(digits, "dcvit", resumed, teacher), "--resume")
    assert rc == 0, err
    assert "2 candidate scores and 0 progressive steps done" in err
    assert artifact.load_report(resumed)["resumed"]
