"""`dcvit plan`, `dcvit compress` and `dcvit eval` end to end on a tiny timm ViT and an
exported digits folder, the checkpoint-file formats, and bad input (one line, exit 2)."""
import argparse
import json
import shlex
import shutil

import pytest
import timm
import torch
from safetensors.torch import save_file

from dcvit_engine.artifact import load, load_report
from dcvit_engine.checkpoints import load_checkpoint
from dcvit_engine.cli import main
from dcvit_engine.compress.api import METHODS
from dcvit_engine.digits import DIGITS_MEAN, DIGITS_STD, export_digits_folder
from dcvit_engine.macs import count_macs
from dcvit_engine.reference import reference_from_timm

NAME = "vit_tiny_patch16_224"
KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 3, "num_classes": 10}
NORM = ["--mean", str(DIGITS_MEAN[0]), "--std", str(DIGITS_STD[0])]
FAST = ["--iters", "3", "--batch-size", "8", "--device", "cpu", "--seed", "1"]


@pytest.fixture(scope="module")
def timm_teacher():
    torch.manual_seed(0)
    return timm.create_model(NAME, pretrained=False, **KWARGS).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory, timm_teacher):
    root = tmp_path_factory.mktemp("cli")
    digits = export_digits_folder(root / "digits", split="train", img_size=32, per_class=2)
    checkpoint = root / "teacher.pth"
    torch.save({"model": timm_teacher.state_dict()}, checkpoint)
    return dict(root=root, digits=str(digits), checkpoint=str(checkpoint))


def dcvit(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def model_args(files):
    return ["--model", NAME, "--model-kwargs", json.dumps(KWARGS), "--checkpoint", files["checkpoint"]]


def test_plan_json(capsys):
    rc, out, _ = dcvit(capsys, "plan", "--model", NAME, "--model-kwargs", json.dumps(KWARGS),
                       "--target-macs", "0.75", "--round", "8", "--json")
    assert rc == 0
    plan = json.loads(out)
    for key in ("blocks_compressed", "hidden_width", "macs", "teacher_macs"):
        assert isinstance(plan[key], int), key
    assert plan["hidden_width"] % 8 == 0 and plan["macs"] < plan["teacher_macs"]


def test_compress_dcvit_then_eval(capsys, files, timm_teacher):
    out_dir = files["root"] / "dcvit_out"
    rc, out, err = dcvit(capsys, "compress", *model_args(files), "--data", files["digits"],
                         "--num-samples", 12, "--method", "dcvit", "--target-macs", 0.7,
                         "--out", out_dir, "--select-iters", 1, "--metric-size", 4, "--metric-iters", 2,
                         *NORM, *FAST)
    assert rc == 0, err
    assert f"wrote {out_dir}" in out
    student = load(out_dir)
    report = load_report(out_dir)
    assert report["method"] == "dcvit" and report["num_samples"] == 12
    assert report["achieved_macs"] == count_macs(student).total
    assert report["target_macs"]["ratio"] == 0.7 and abs(report["achieved_ratio"] - 0.7) < 0.01
    assert len(report["extras"]["block_scores"]) == 2 and report["extras"]["chosen_blocks"]
    assert report["extras"]["losses"]["progressive"] and set(report["timings"]) >= {"total_s"}
    assert not (files["root"] / "dcvit_out.partial").exists()
    # the --checkpoint weights were the teacher: untouched tensors are the checkpoint's
    assert torch.equal(student.head.weight, timm_teacher.head.weight)

    rc, out, err = dcvit(capsys, "eval", out_dir, "--data", files["digits"], "--teacher", NAME,
                         "--model-kwargs", json.dumps(KWARGS), "--checkpoint", files["checkpoint"],
                         "--device", "cpu", "--json", *NORM)
    assert rc == 0, err
    result = json.loads(out)
    assert result["images"] == 20 and 0 <= result["top1"] <= 1 and 0 <= result["agreement"] <= 1
    assert result["teacher_macs"] == count_macs(reference_from_timm(timm_teacher)).total


def test_compress_practise_and_resume(capsys, files, monkeypatch):
    out_dir = files["root"] / "practise_out"
    argv = ["compress", *model_args(files), "--data", files["digits"], "--num-samples", 8,
            "--method", "practise", "--target-macs", 0.7, "--out", out_dir, "--adaptor-iters", 2,
            "--rounding", "down", *NORM, *FAST]  # down: at most the target's MACs
    from dcvit_engine.compress import practise
    real = practise.feature_mimic_finetune

    def interrupted(*args, **kwargs):
        if kwargs["iters"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(practise, "feature_mimic_finetune", interrupted)
    rc, out, err = dcvit(capsys, *argv, "--resume")  # nothing to resume yet: says so, starts
    assert rc == 130 and out.splitlines()[0] == (f"--resume: no checkpoint in {out_dir}.partial, "
                                                 "so this run starts from scratch")
    shutil.rmtree(f"{out_dir}.partial")
    rc, _, err = dcvit(capsys, *argv)
    assert rc == 130 and (files["root"] / "practise_out.partial" / "state.json").is_file()
    assert err.strip().splitlines()[-1] == (  # what was kept and the exact command that resumes
        f"dcvit compress: interrupted; kept the completed steps in {out_dir}.partial; resume with: "
        + shlex.join(["dcvit", *map(str, argv), "--resume"]))
    monkeypatch.setattr(practise, "feature_mimic_finetune", real)
    rc, _, err = dcvit(capsys, *argv)
    assert rc == 2 and "--resume" in err and len(err.strip().splitlines()) == 1
    rc, out, err = dcvit(capsys, *argv, "--resume")
    assert rc == 0, err
    report = load_report(out_dir)
    assert report["method"] == "practise" and report["resumed"]
    assert report["achieved_macs"] == count_macs(load(out_dir)).total <= report["target_macs"]["macs"]
    rc, _, err = dcvit(capsys, *argv)  # an artifact is replaced only when asked to
    assert rc == 2 and "holds an artifact already; add --overwrite" in err
    assert len(err.strip().splitlines()) == 1
    rc, out, err = dcvit(capsys, *argv, "--overwrite")
    assert rc == 0 and "holds an artifact already: it is replaced when this run ends" in out, err


@pytest.mark.parametrize("case", ["unknown model", "target range", "infeasible", "too few images",
                                  "corrupt checkpoint", "other model", "wrong method option"])
def test_bad_input_is_one_line_exit_2(capsys, files, case):
    args = {"--model": NAME, "--model-kwargs": json.dumps(KWARGS), "--data": files["digits"],
            "--num-samples": "8", "--target-macs": "0.7", "--out": str(files["root"] / "bad_out")}
    extra, expected = [], None
    if case == "unknown model":
        args["--model"], expected = "vit_tinny_patch16_224", "unknown timm model"
    elif case == "target range":
        args["--target-macs"], expected = "1.5", "out of range"
    elif case == "infeasible":
        args["--target-macs"], expected = "0.99", "largest feasible target"
    elif case == "too few images":
        args["--num-samples"], expected = "500", "holds only 20"
    elif case == "corrupt checkpoint":
        bad = files["root"] / "corrupt.pth"
        bad.write_bytes(b"\x00not a checkpoint" * 8)
        extra, expected = ["--checkpoint", str(bad)], "corrupt"
    elif case == "other model":
        other = timm.create_model(NAME, pretrained=False, **dict(KWARGS, depth=3, embed_dim=64, num_heads=4))
        path = files["root"] / "other.safetensors"
        save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
        extra = ["--checkpoint", str(path)]
        expected = "blocks.0.attn.proj.weight is (64, 64), the model needs (48, 48)"
    else:
        extra, expected = ["--method", "dcvit", "--adaptor-iters", "3"], "--adaptor-iters"
    argv = ["compress"] + [x for kv in args.items() for x in kv] + extra + FAST
    rc, out, err = dcvit(capsys, *argv)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], err
    assert not (files["root"] / "bad_out").exists()


def test_checkpoint_formats(files, timm_teacher, tmp_path):
    state = timm_teacher.state_dict()
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3}, wrapped)
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(plain))
    for path in (wrapped, plain, files["checkpoint"]):
        model = timm.create_model(NAME, pretrained=False, **KWARGS)
        load_checkpoint(model, path)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), state.values()))
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": state, "args": argparse.Namespace(lr=1)}, pickled)  # refused by weights_only
    with pytest.raises(ValueError, match="holds a Python object"):
        load_checkpoint(timm.create_model(NAME, pretrained=False, **KWARGS), pickled)


class _Reached(Exception):
    """Raised by the recording method stand-in: the options have been seen, stop there."""


@pytest.mark.parametrize("method", list(METHODS))
def test_cli_passes_only_given_options_so_method_defaults_hold(capsys, files, monkeypatch, method):
    import functools

    from dcvit_engine.compress.api import method_defaults, method_module
    module, function_name = method_module(method), f"compress_{method}"
    real = getattr(module, function_name)
    seen = []

    @functools.wraps(real)  # keeps the signature the CLI reads the accepted options from
    def recording(model, images, target_macs, **options):
        seen.append(options)
        raise _Reached

    monkeypatch.setattr(module, function_name, recording)
    base = ["compress", *model_args(files), "--data", files["digits"], "--num-samples", 8,
            "--method", method, "--target-macs", 0.7, "--out", files["root"] / f"{method}_defaults",
            "--device", "cpu", *NORM]
    with pytest.raises(_Reached):
        dcvit(capsys, *base)
    options = seen.pop()
    for name in ("iters", "batch_size", "lr", "finetune_iters", "token_share", "metric_iters"):
        assert name not in options, f"--method {method} got {name} although the user did not give it"
    assert options["device"] == "cpu" if "device" in method_defaults(method) else "device" not in options
    if "iters" in method_defaults(method):  # a value the user gives does reach the method
        with pytest.raises(_Reached):
            dcvit(capsys, *base, "--iters", 7, "--lr", 0.25)
        given = seen.pop()
        assert given["iters"] == 7 and given["lr"] == 0.25 and "batch_size" not in given
    assert not (files["root"] / f"{method}_defaults").exists()


def test_help_shows_each_methods_own_defaults(capsys):
    from dcvit_engine.compress.api import method_defaults
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    dcvit_defaults = method_defaults("dcvit")
    assert f"dcvit (default {dcvit_defaults['iters']})" in text
    for method in ("uvc", "cait"):
        defaults = method_defaults(method)
        assert (f"{method} (default {defaults['iters']})" in text
                and f"{method} (default {defaults['lr']})" in text)
        assert f"{method} (default {defaults['batch_size']})" in text
    assert "--round {8,64}" in text and "--neuron-selection {random,activation}" in text


def test_sweep_leaves_out_options_not_given():
    from dcvit_engine.cli.sweep import _options_for
    given = dict(iters=None, batch_size=None, seed=3, device="cpu")
    assert _options_for("uvc", given) == dict(seed=3, device="cpu")
    assert _options_for("tome", dict(given, iters=5)) == {}
    assert _options_for("cait", dict(given, iters=5)) == dict(iters=5, seed=3, device="cpu")


def test_nonfinite_images_or_teacher_outputs_are_refused(capsys, files, timm_teacher):
    import dcvit_engine
    images = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    images[2, 1, 5, 5], images[6, 0, 0, 0] = float("nan"), float("inf")
    for method in ("uvc", "dcvit"):
        with pytest.raises(ValueError, match="^2 of 7 images hold NaN or Inf values"):
            dcvit_engine.compress(timm_teacher, images, method=method, target_macs=0.7)
    # a checkpoint whose weights give NaN: compress and eval refuse in one line, write nothing
    broken = {k: v.clone() for k, v in timm_teacher.state_dict().items()}
    broken["blocks.0.mlp.fc1.bias"][0] = float("nan")
    path = files["root"] / "nan_teacher.pth"
    torch.save(broken, path)
    out_dir = files["root"] / "nan_out"
    argv = ["compress", "--model", NAME, "--model-kwargs", json.dumps(KWARGS), "--checkpoint", path,
            "--data", files["digits"], "--num-samples", 8, "--method", "uvc", "--target-macs", 0.7,
            "--out", out_dir, *NORM, *FAST]
    rc, _, err = dcvit(capsys, *argv)
    assert rc == 2 and err.count("\n") == 1 and "the teacher gives NaN or Inf outputs on 8 of 8 images" in err
    assert not out_dir.exists() and not (files["root"] / "nan_out.partial").exists()
    rc, _, err = dcvit(capsys, *argv[:-len(NORM) - len(FAST)], "--mean", "nan", "--std", "0.3", *FAST)
    assert rc == 2 and err.count("\n") == 1 and "preprocessing mean must be finite" in err
    assert not out_dir.exists()
    # eval: NaN images, and an artifact whose forward is NaN
    from dcvit_engine.artifact import save
    from dcvit_engine.preprocess import config_from_timm
    broken_model = reference_from_timm(timm_teacher)
    broken_model.load_state_dict(broken)
    save(broken_model, files["root"] / "nan_artifact", preprocess=config_from_timm(timm_teacher))
    save(timm_teacher, files["root"] / "good_artifact")
    eval_args = ["--data", files["digits"], "--device", "cpu", "--json"]
    rc, out, err = dcvit(capsys, "eval", files["root"] / "good_artifact", *eval_args, "--mean", "nan")
    assert rc == 2 and not out and err.count("\n") == 1 and "preprocessing mean must be finite" in err
    rc, out, err = dcvit(capsys, "eval", files["root"] / "nan_artifact", *eval_args, *NORM)
    assert rc == 2 and not out and err.count("\n") == 1 and "NaN or Inf outputs on 20 of 20 images" in err
