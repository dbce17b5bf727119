"""`dcvit reproduce` end to end on a tiny model and a tiny ImageNet-layout folder."""
import json
import shutil

import pytest
import timm
import torch

from dcvit_engine import reproduce
from dcvit_engine.adapter import spec_from_timm
from dcvit_engine.cli import main
from dcvit_engine.compress import api
from dcvit_engine.compress.structure import plan_dcvit
from dcvit_engine.digits import export_digits_folder
from dcvit_engine.preprocess import imagenet_default

MODEL = ["--model", "vit_tiny_patch16_224", "--model-kwargs",
         '{"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 3, "num_classes": 10}']
FAST = ["--samples", "8,10", "--points", "1", "--iters", "2", "--batch-size", "8", "--metric-size", "3",
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
    assert sorted(results["runs"]) == ["dcvit-n10-k1-s0", "dcvit-n8-k1-s0", "practise-n10-k1-s0",
                                       "practise-n8-k1-s0"]
    settings = results["settings"]
    assert settings["macs_convention"] == "official" and settings["augment"] == "official"
    for run in results["runs"].values():
        assert 0 <= run["top1"] <= 100 and run["macs_ratio"] < 0.8
    paired = results["runs"]["dcvit-n8-k1-s0"], results["runs"]["practise-n8-k1-s0"]
    assert abs(paired[0]["flops_cut"] - paired[1]["flops_cut"]) < 0.01, "equal MACs in the official count"
    assert len(paired[0]["chosen_blocks"]) == 2 and len(paired[1]["chosen_blocks"]) == 1
    assert results["runs"]["practise-n8-k1-s0"]["recipe"] == "official"
    # no source gives a number for these cells: said before the run, "-" in their rows
    assert "no sourced number for the cells (images, blocks PRACTISE drops) (8, 1), (10, 1)" in printed
    table = [line for line in printed.splitlines() if line.startswith("|")]
    assert "top-1 (paper)" in table[0] and "seeds" in table[0]
    runs = [line for line in table[2:] if "teacher" not in line and "not stated" not in line]
    assert len(runs) == 4 and all(line.rstrip(" |").endswith("-") for line in runs)
    # the sourced DeiT-B pair prints only in its own cell (image count not stated), with its source
    paper_rows = [line for line in table if "not stated" in line]
    assert len(paper_rows) == 2 and all("16.6%" in line and "[secondary]" in line for line in paper_rows)
    assert any("81.26" in line for line in paper_rows) and any("79.30" in line for line in paper_rows)
    assert "[secondary] a secondary summary" in printed and "FLOPs cut in the official MACs count" in printed
    assert (out / "runs" / "dcvit-n8-k1-s0").is_dir()
    plan = next(line for line in printed.splitlines() if line.startswith("plan: "))
    assert "metric set seed 0" in plan and "no estimate yet" in plan  # nothing timed before the start

    def refuse(*_args, **_kwargs):
        raise AssertionError("a finished run was computed again")

    monkeypatch.setattr(api, "compress", refuse)  # everything is done: the rerun only prints
    assert main(args) == 0
    assert json.loads((out / "results.json").read_text())["runs"] == results["runs"]
    assert "plan: no iterative phases (0 steps)" in capsys.readouterr().out  # finished cells are not planned


def test_few_shot_draw_takes_one_image_per_class(imagenet_like):
    classes = sorted(p.name for p in (imagenet_like / "train").iterdir() if p.is_dir())
    config = imagenet_default((32, 32))
    draw = lambda n, seed: reproduce.few_shot_draw(imagenet_like / "train", classes, n, seed,  # noqa: E731
                                                   config)
    images, labels = draw(10, 0)
    assert images.shape == (10, 3, 32, 32) and labels.tolist() == list(range(10))
    images, labels = draw(4, 1)  # fewer than the classes: a random class each, distinct images
    assert len(labels) == 4 and len({tuple(img.flatten()[:64].tolist()) for img in images}) == 4
    assert torch.equal(draw(4, 1)[0], images), "seeded"


def test_official_macs_convention_gives_the_official_deit_b_widths():
    """DeiT-B: 2 / 3 / 4 compressed blocks at the MACs of 1 / 2 / 3 dropped blocks get MLP widths
    3.0 / 2.0 / 1.5 x 768 in the official count (2304 / 1536 / 1152); the full count, with QK^T and
    A.V, gives other widths. Planning needs no data and no weights."""
    with torch.device("meta"):
        spec = spec_from_timm(timm.create_model("deit_base_patch16_224", pretrained=False))
    widths = {}
    for convention in ("official", "full"):
        widths[convention] = [plan_dcvit(spec, 1 - reproduce.flops_cut(spec, k, convention), num_blocks=k + 1,
                                         macs_convention=convention).hidden_width for k in (1, 2, 3)]
    assert widths["official"] == [2304, 1536, 1152]
    assert widths["full"] != widths["official"]
    assert [round(100 * reproduce.flops_cut(spec, k, "official"), 1) for k in (1, 2, 3)] == [8.3, 16.6, 24.8]


def test_paper_numbers_are_keyed_by_cell():
    assert reproduce.paper_cell(50, 2) is None and reproduce.paper_cell(1000, 2) is None
    cell = reproduce.paper_cell(None, 2)
    assert (cell["dcvit"], cell["practise"], cell["source"]) == (81.26, 79.30, "secondary")
    assert reproduce.cells_without_paper([50, 1000], [2]) == [(50, 2), (1000, 2)]


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


def test_interrupted_reproduction_says_what_was_kept_and_how_to_resume(imagenet_like, tmp_path, capsys,
                                                                        monkeypatch):
    import shlex

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "compress", interrupted)
    out = tmp_path / "repro"
    args = ["reproduce", *MODEL, "--data", str(imagenet_like), "--out", str(out), *FAST]
    assert main(args) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"dcvit reproduce: interrupted; kept the finished runs in {out}/results.json and the "
                    f"unfinished run's checkpoint under {out}/runs; resume with the same command: "
                    + shlex.join(["dcvit", *args]))
    assert "teacher_top1" in json.loads((out / "results.json").read_text())
