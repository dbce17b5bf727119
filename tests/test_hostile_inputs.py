"""Inputs a hostile or unlucky user gives: files too large, too deep or of the wrong type,
specs of absurd size, decompression bombs, bad images read by DataLoader workers, folders
with more classes than the model, option values out of range, empty or repeated lists.
Each is refused with one line naming what to fix, before any work, leaving nothing behind."""
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

import dcvit_engine.cli.reproduce as reproduce_cli
from dcvit_engine.artifact import save
from dcvit_engine.cli import main
from dcvit_engine.data import load_image_folder
from dcvit_engine.digits import export_digits_folder
from dcvit_engine.errors import InputError, ResourceLimitError, SpecError, UserError
from dcvit_engine.jsonfile import load_json_file
from dcvit_engine.spec import MAX_PARAMETERS, ViTSpec
from tests.compress_cli import TINY_VIT

TINY_ARGS = ["--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(TINY_VIT)]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT).eval()
    return save(model, tmp_path_factory.mktemp("art") / "tiny")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return export_digits_folder(tmp_path_factory.mktemp("digits") / "d", per_class=1)


def last_error(capsys, command):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"dcvit {command}: error: "), err
    return line


# ---- JSON the project reads ---------------------------------------------------------
def test_json_too_deep_too_large_or_of_the_wrong_type(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ResourceLimitError, match="deep.json is nested too deeply"):
        load_json_file(deep, expect=None)
    nested = tmp_path / "nested.json"
    nested.write_text('{"a": ' + "[" * 33 + "1" + "]" * 33 + "}")  # 34 levels with the object
    with pytest.raises(ResourceLimitError, match="nested 34 levels deep"):
        load_json_file(nested)
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"x": "y" * 2000}))
    with pytest.raises(ResourceLimitError, match="big.json is 2009 bytes, more than the 1000"):
        load_json_file(big, max_bytes=1000)
    listed = tmp_path / "results.json"
    listed.write_text("[1, 2]")
    with pytest.raises(InputError, match="results.json holds a JSON list, expected a JSON object"):
        load_json_file(listed)


def test_a_deeply_nested_spec_is_one_line(artifact, tmp_path, capsys):
    hostile = tmp_path / "deep"
    shutil.copytree(artifact, hostile)
    (hostile / "spec.json").write_text('{"blocks": ' + "[" * 50_000 + "]" * 50_000 + "}")
    assert main(["info", str(hostile)]) == 2
    assert "spec.json is nested too deeply" in last_error(capsys, "info")


def test_a_report_holding_a_list_is_one_line(artifact, tmp_path, capsys):
    hostile = tmp_path / "listed"
    shutil.copytree(artifact, hostile)
    (hostile / "report.json").write_text("[]")
    from dcvit_engine.artifact import load_report
    with pytest.raises(InputError, match="report.json holds a JSON list"):
        load_report(hostile)


# ---- spec sizes ---------------------------------------------------------------------
@pytest.mark.parametrize("field,value,named", [
    ("embed_dim", 10**9, "embed_dim: 1000000000 is above the limit"),
    ("num_classes", 10**8, "num_classes: 100000000 is above the limit"),
    ("img_size", [10**6, 32], "img_size (height): 1000000 is above the limit"),
    ("mlp_hidden", 10**7, "blocks[0].mlp_hidden: 10000000 is above the limit"),
    ("qk_dims", [10**5] * 3, "blocks[0].attn.qk_dims: 100000 is above the limit"),
    ("patch_size", 1, "patch_size: img_size (4096, 4096) / patch_size 1 gives 16777217 tokens"),
])
def test_absurd_spec_dimensions_are_refused_naming_the_field(artifact, field, value, named):
    data = json.loads((artifact / "spec.json").read_text())
    if field in ("mlp_hidden",):
        data["blocks"][0][field] = value
    elif field == "qk_dims":
        data["blocks"][0]["attn"]["qk_dims"] = value
    elif field == "patch_size":
        data.update(img_size=[4096, 4096], patch_size=1)
    else:
        data[field] = value
    with pytest.raises(SpecError, match=named.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        ViTSpec.from_dict(data)


def test_the_memory_estimate_names_the_largest_part(artifact):
    data = json.loads((artifact / "spec.json").read_text())
    wide = dict(data["blocks"][0], mlp_hidden=131072)
    data.update(embed_dim=16384, blocks=[wide] * 10)  # each dimension allowed, the sum is not
    with pytest.raises(SpecError, match=r"blocks\[0\].mlp_hidden: the model would hold .* above the limit"):
        ViTSpec.from_dict(data)
    assert MAX_PARAMETERS > 22e9  # ViT-22B still fits


# ---- images -------------------------------------------------------------------------
def test_a_decompression_bomb_names_the_file(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64*64 > 2x the limit: PIL's error
    with pytest.raises(ResourceLimitError, match=r"bomb.png is refused as a decompression bomb"):
        load_image_folder(tmp_path, 32)


def test_a_truncated_image_read_by_a_worker_is_the_original_line(artifact, digits, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(digits, data)
    broken = sorted((data / "7").iterdir())[0]
    broken.write_bytes(broken.read_bytes()[:60])  # header intact, pixels cut off
    rc = main(["infer", str(artifact), "--data", str(data), "--out", str(tmp_path / "p.csv"), "--device",
               "cpu", "--num-workers", "2", "--no-progress"])
    line = last_error(capsys, "infer")
    assert rc == 2 and line.startswith(f"dcvit infer: error: {broken} is not a readable image"), line
    assert "DataLoader worker" not in line and not (tmp_path / "p.csv").exists()


# ---- eval: classes ------------------------------------------------------------------
def test_eval_refuses_more_class_folders_than_the_model_has(artifact, digits, tmp_path, capsys):
    data = tmp_path / "twelve"
    shutil.copytree(digits, data)
    for extra in ("cat", "dog"):
        shutil.copytree(digits / "0", data / extra)
    assert main(["eval", str(artifact), "--data", str(data), "--device", "cpu", "--json"]) == 2
    line = last_error(capsys, "eval")
    assert "has 12 class folders but the model predicts 10 classes" in line and "--class-names" in line
    names = tmp_path / "names.txt"
    names.write_text("\n".join(str(i) for i in range(10)))
    assert main(["eval", str(artifact), "--data", str(data), "--device", "cpu",
                 "--class-names", str(names)]) == 2
    assert "class folder(s) cat, dog" in last_error(capsys, "eval")


def test_eval_maps_class_folders_by_name(artifact, digits, tmp_path, capsys):
    """Folders named in another order than the model's classes: --class-names maps them, and
    the top-1 is the one computed with the model's own class indices."""
    data = tmp_path / "renamed"
    data.mkdir()
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for i, word in enumerate(words):
        shutil.copytree(digits / str(i), data / word)  # sorted folder order != model order
    names = tmp_path / "names.txt"
    names.write_text("\n".join(words))
    assert main(["eval", str(artifact), "--data", str(data), "--device", "cpu", "--json",
                 "--class-names", str(names)]) == 0
    mapped = json.loads(capsys.readouterr().out)["top1"]
    assert main(["eval", str(artifact), "--data", str(digits), "--device", "cpu", "--json"]) == 0
    assert mapped == json.loads(capsys.readouterr().out)["top1"]


# ---- option values ------------------------------------------------------------------
@pytest.mark.parametrize("argv,named", [
    (["eval", "art", "--data", "d", "--batch-size", "0"], "--batch-size must be >= 1, got '0'"),
    (["infer", "--data", "d", "--out", "x.csv", "--num-workers", "-1"], "--num-workers must be >= 0"),
    (["compress", "--data", "d", "--num-samples", "0", "--target-macs", "0.5", "--out", "o"],
     "--num-samples must be >= 1"),
    (["bench", "--batch-size", "many"], "--batch-size must be a whole number, got 'many'"),
])
def test_option_values_are_checked_where_parsed(capsys, tmp_path, argv, named):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err


def test_sweep_refuses_empty_and_repeated_lists_before_any_work(digits, tmp_path, capsys, monkeypatch):
    import dcvit_engine.cli.sweep as sweep_cli
    monkeypatch.setattr(sweep_cli, "model_from_args", lambda args: pytest.fail("work started"))
    base = ["sweep", *TINY_ARGS, "--data", str(digits), "--num-samples", "4", "--eval-data", str(digits),
            "--out", str(tmp_path / "out")]
    for extra, named in [(["--methods", ","], "--methods names no method"),
                         (["--methods", "tome,tome"], "--methods names tome more than once"),
                         (["--targets", "0.8,0.8"], "--targets names 0.8 more than once")]:
        assert main(base + extra) == 2
        assert named in last_error(capsys, "sweep")
    assert not (tmp_path / "out").exists()


def test_run_sweep_refuses_repeated_targets():
    from dcvit_engine.sweep import run_sweep
    with pytest.raises(InputError, match="targets must be distinct"):
        run_sweep(None, None, None, None, {"tome": {}}, [0.8, 0.8])
    with pytest.raises(InputError, match="no methods"):
        run_sweep(None, None, None, None, {}, [0.8])


# ---- reproduce: the device ----------------------------------------------------------
def test_reproduce_without_cuda_says_how_to_run_on_the_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "repro"
    assert main(["reproduce", *TINY_ARGS, "--data", str(tmp_path), "--out", str(out)]) == 2
    assert "give --device cpu" in last_error(capsys, "reproduce") and not out.exists()
    assert reproduce_cli.reproduction_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert reproduce_cli.reproduction_device(None) == "cuda"


def test_reproduce_failing_leaves_no_empty_folder(tmp_path, capsys, monkeypatch):
    import dcvit_engine.reproduce as reproduce

    def fails_on_the_device(teacher, root, out, **kwargs):
        Path(out).mkdir(parents=True)
        raise InputError("the device failed")

    monkeypatch.setattr(reproduce, "run_reproduction", fails_on_the_device)
    out = tmp_path / "repro"
    assert main(["reproduce", *TINY_ARGS, "--data", str(tmp_path), "--device", "cpu", "--out", str(out)]) == 2
    assert "the device failed" in last_error(capsys, "reproduce") and not out.exists()


def test_every_user_error_type_is_a_user_error():
    from dcvit_engine.adapter import UnsupportedModelError
    from dcvit_engine.cli import CommandError
    from dcvit_engine.export import ExportError
    from dcvit_engine.ops.dispatch import BackendUnavailableError
    for cls in (CommandError, UnsupportedModelError, ExportError, BackendUnavailableError, SpecError):
        assert issubclass(cls, UserError)
    assert issubclass(UnsupportedModelError, ValueError) and issubclass(BackendUnavailableError, RuntimeError)
