"""`dcvit reproduce` end to end on a tiny model and a tiny ImageNet-layout folder."""
import json
import shutil

import pytest

from dcvit_engine.cli import main
from dcvit_engine.compress import api
from dcvit_engine.digits import export_digits_folder

MODEL = ["--model", "vit_tiny_patch16_224", "--model-kwargs",
         '{"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 3, "num_classes": 10}']
FAST = ["--samples", "8,12", "--points", "1", "--iters", "2", "--batch-size", "8", "--metric-size", "3",
        "--metric-iters", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    export_digits_folder(root / "train", "train", img_size=32, per_class=2)
    export_digits_folder(root / "val", "test", img_size=32, per_class=1)
    return root


def test_reproduce_runs_records_and_resumes(imagenet_like, tmp_path, capsys, monkeypatch):
    out = tmp_path / "repro"
    args = ["reproduce", *MODEL, "--data", str(imagenet_like), "--out", str(out), *FAST]
    assert main(args) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["runs"]) == ["dcvit-n12-k1", "dcvit-n8-k1", "practise-n12-k1", "practise-n8-k1"]
    for run in results["runs"].values():
        assert 0 <= run["top1"] <= 100 and run["macs_ratio"] < 0.8
    paired = results["runs"]["dcvit-n8-k1"], results["runs"]["practise-n8-k1"]
    assert abs(paired[0]["macs_ratio"] - paired[1]["macs_ratio"]) < 0.01, "equal MACs"
    assert len(paired[0]["chosen_blocks"]) == 2 and len(paired[1]["chosen_blocks"]) == 1
    assert results["runs"]["practise-n8-k1"]["recipe"] == "official"
    table = [line for line in printed.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 1 + 4 and "top-1 (paper)" in table[0]
    assert (out / "runs" / "dcvit-n8-k1").is_dir()

    def refuse(*_args, **_kwargs):
        raise AssertionError("a finished run was computed again")

    monkeypatch.setattr(api, "compress", refuse)  # everything is done: the rerun only prints
    assert main(args) == 0
    assert json.loads((out / "results.json").read_text())["runs"] == results["runs"]


def test_bad_folders_and_points_are_one_line_errors(imagenet_like, tmp_path, capsys):
    out = tmp_path / "never"
    no_val = tmp_path / "no_val"
    shutil.copytree(imagenet_like / "train", no_val / "train")
    base = ["reproduce", *FAST, "--out", str(out)]
    assert main(base + MODEL + ["--data", str(no_val)]) == 2
    assert "has no val split" in capsys.readouterr().err
    wrong_head = [MODEL[0], MODEL[1], MODEL[2], MODEL[3].replace('"num_classes": 10', '"num_classes": 7')]
    assert main(base + wrong_head + ["--data", str(imagenet_like)]) == 2
    assert "10 classes but the model's head has 7" in capsys.readouterr().err
    assert main(base + MODEL + ["--data", str(imagenet_like), "--points", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot compress 3 blocks" in err and "\n" not in err
    assert not out.exists(), "nothing written"
