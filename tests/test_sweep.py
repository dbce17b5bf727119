"""`dcvit sweep`: every method/target row evaluated on the engine, a table, CSV and PNG."""
import csv
import json

import pytest
import timm

from dcvit_engine.cli import main
from dcvit_engine.digits import DIGITS_MEAN, DIGITS_STD, export_digits_folder

MODEL_KWARGS = ('{"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 3, '
                '"num_classes": 10}')


@pytest.fixture(scope="module")
def digits_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    return (export_digits_folder(root / "train", "train", img_size=32, per_class=4),
            export_digits_folder(root / "test", "test", img_size=32, per_class=3))


def test_sweep_writes_table_csv_and_plot(digits_folders, tmp_path, capsys):
    train, test = digits_folders
    out = tmp_path / "sweep"
    norm = ["--mean", ",".join(map(str, DIGITS_MEAN)), "--std", ",".join(map(str, DIGITS_STD))]
    status = main(["sweep", "--model", "vit_tiny_patch16_224", "--model-kwargs", MODEL_KWARGS,
                   "--data", str(train), "--num-samples", "16", "--eval-data", str(test),
                   "--methods", "tome,practise", "--targets", "0.8,0.6", "--iters", "2",
                   "--recipe", "official", "--batch-size", "8", *norm, "--out", str(out)])
    assert status == 0
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 5 and "method" in table[0], "header, rule, one line per row"
    assert "target (got)" in table[0] and any("| 0.80 (0.767) |" in line for line in table), \
        "the MACs fraction reached beside the target"
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [r["method"] for r in rows] == ["teacher", "tome", "tome",
                                           "practise-official", "practise-official"]
    for row in rows[1:]:
        assert float(row["macs_ratio"]) <= float(row["target"]) * 1.005
        assert 0 <= float(row["agreement"]) <= 1 and float(row["latency_ms"]) > 0
    assert (out / "sweep.png").stat().st_size > 10_000
    assert not list(out.glob(".*tmp*")), "no temporary files left behind"


def test_sweep_rejects_bad_targets_and_methods(digits_folders, tmp_path, capsys):
    train, test = digits_folders
    base = ["sweep", "--model", "vit_tiny_patch16_224", "--model-kwargs", MODEL_KWARGS,
            "--data", str(train), "--num-samples", "8", "--eval-data", str(test), "--out", str(tmp_path)]
    assert main(base + ["--targets", "0.8,1.5"]) == 2
    assert "--targets" in capsys.readouterr().err
    assert main(base + ["--methods", "dcvit,magic"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(base + ["--methods", "dcvit,tome", "--adaptor-iters", "3", "--finetune-iters", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--adaptor-iters, --finetune-iters appl(ies) to none of --methods dcvit,tome")


def test_selection_cost_follows_the_knobs_and_the_budget():
    """DC-ViT scores every candidate after select_iters (equal budget: the whole --iters
    unless given); UVC searches --iters per target; the lines name what they count."""
    from dcvit_engine.adapter import spec_from_timm
    from dcvit_engine.sweep import selection_cost

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **json.loads(MODEL_KWARGS))
    spec = spec_from_timm(model)
    assert selection_cost("dcvit", dict(iters=8), spec, [0.8, 0.7]).startswith(
        "dcvit: selection 2 candidates x 8 iterations per target = 32 over 2 target(s)")
    assert selection_cost("dcvit", dict(iters=8, select_iters=3), spec, [0.8], "official").startswith(
        "dcvit: selection 2 candidates x 3 iterations per target = 6 over 1 target(s)")
    assert selection_cost("uvc", dict(iters=5, finetune_iters=2), spec, [0.8, 0.7]) == (
        "uvc: search 5 iterations per target = 10 over 2 target(s); student 2 iterations per target")


def test_seeds_equal_budget_and_equal_macs_pairs(digits_folders, tmp_path, capsys):
    """Two draws; DC-ViT is also run at PRACTISE's MACs point with one block more; each
    student's finetuning budget is the same total and stated; the table shows mean ± std."""
    train, test = digits_folders
    out = tmp_path / "sweep"
    norm = ["--mean", ",".join(map(str, DIGITS_MEAN)), "--std", ",".join(map(str, DIGITS_STD))]
    status = main(["sweep", "--model", "vit_tiny_patch16_224", "--model-kwargs", MODEL_KWARGS,
                   "--data", str(train), "--num-samples", "12", "--eval-data", str(test),
                   "--methods", "dcvit,practise", "--targets", "0.8", "--iters", "4", "--seeds", "2",
                   "--metric-size", "4", "--metric-iters", "2", "--batch-size", "8", *norm,
                   "--out", str(out)])
    assert status == 0
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 4, "teacher, dcvit, practise, dcvit@practise"
    assert all("±" in line for line in table[3:]) and "FT iters" in table[0]
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(r["method"], r["seed"]) for r in rows[1:]] == [
        ("dcvit", "0"), ("practise", "0"), ("dcvit@practise", "0"),
        ("dcvit", "1"), ("practise", "1"), ("dcvit@practise", "1")]
    by = {(r["method"], r["seed"]): r for r in rows[1:]}
    for seed in "01":
        practise, paired = by[("practise", seed)], by[("dcvit@practise", seed)]
        assert abs(float(paired["macs_ratio"]) - float(practise["macs_ratio"])) < 0.01
        assert practise["budget"].startswith("4 ") and "sel" in practise["budget"]
        assert paired["budget"].startswith("2x2 "), "4 iterations split over DC-ViT's two steps"
        assert "of 1:" in paired["blocks"] and " 2:" in paired["blocks"], "every candidate's score"
    assert (out / "sweep.png").stat().st_size > 10_000


def test_no_seeds_and_unpaired_targets_are_one_line_errors(digits_folders, tmp_path, capsys):
    train, test = digits_folders
    out = tmp_path / "never"
    base = ["sweep", "--model", "vit_tiny_patch16_224", "--model-kwargs", MODEL_KWARGS, "--data", str(train),
            "--num-samples", "8", "--eval-data", str(test), "--methods", "dcvit,practise", "--out", str(out)]
    assert main(base + ["--targets", "0.8", "--seeds", "0"]) == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err
    # PRACTISE drops both candidate blocks of the depth-4 model: DC-ViT cannot use a third
    assert main(base + ["--targets", "0.6"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no equal-MACs pair" in err and "\n" not in err
    assert not out.exists(), "nothing written"


def test_rounding_option_reaches_plan_compress_and_sweep(capsys):
    """--rounding picks the whole-block count (nearest by default) in plan, compress and sweep."""
    base = ["plan", "--model", "vit_tiny_patch16_224", "--model-kwargs", MODEL_KWARGS, "--method", "practise",
            "--target-macs", "0.7", "--json"]
    blocks = {}
    for rounding in (None, "down", "up"):
        assert main(base + ([] if rounding is None else ["--rounding", rounding])) == 0
        blocks[rounding] = json.loads(capsys.readouterr().out)["blocks_compressed"]
    assert blocks == {None: 1, "down": 2, "up": 1}, "0.767 is nearer 0.7 than 0.535"
    for command in ("compress", "sweep"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--rounding {nearest,down,up}" in capsys.readouterr().out


def test_sweep_keeps_each_row_and_resumes(digits_folders, tmp_path, capsys, monkeypatch):
    """Each finished row is on disk at once; SIGTERM (sent from inside the second
    compression) says what was kept and the command that resumes; an existing --out needs
    --resume or --overwrite; a resume with other settings is refused naming them; the resume
    runs only the missing row."""
    import os
    import shlex
    import signal

    from dcvit_engine.compress import api

    train, test = digits_folders
    out = tmp_path / "sweep"
    norm = ["--mean", ",".join(map(str, DIGITS_MEAN)), "--std", ",".join(map(str, DIGITS_STD))]
    argv = ["sweep", "--model", "vit_tiny_patch16_224", "--model-kwargs", MODEL_KWARGS, "--data", str(train),
            "--num-samples", "8", "--eval-data", str(test), "--methods", "tome,practise", "--targets", "0.8",
            "--iters", "1", "--adaptor-iters", "2", "--batch-size", "8", "--metric-size", "2",
            "--metric-iters", "2", *norm, "--out", str(out)]
    real, calls = api.compress, []

    def terminated_at_second(*args, **kwargs):
        calls.append(kwargs["method"])
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "compress", terminated_at_second)
    assert main(argv) == 143
    err = capsys.readouterr().err.strip().splitlines()[-1]  # the lines before: progress
    assert err.startswith("dcvit sweep: terminated; kept 1 finished row(s)")
    assert err.endswith("resume with: " + shlex.join(["dcvit", *argv, "--resume"]))
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [r["method"] for r in rows] == ["teacher", "tome"]
    assert "    tome | 0.80 (0.760) |" in (out / "sweep.md").read_text()

    calls.clear()
    monkeypatch.setattr(api, "compress", lambda *a, **k: calls.append(k["method"]) or real(*a, **k))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "holds an earlier sweep" in err and "--resume" in err and "--overwrite" in err and "\n" not in err
    assert main([*argv, "--resume", "--targets", "0.7", "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--seed was 0, now 1" in err and "--targets was '0.8', now '0.7'" in err and "\n" not in err
    assert calls == []

    assert main([*argv, "--resume"]) == 0
    assert calls == ["practise"], "only the missing row"
    printed = capsys.readouterr().out
    # each method's selection cost before it runs, with the knobs given (--adaptor-iters 2)
    assert ("practise: selection 2 candidates x 2 adaptor iterations = 4, once (scores are reused across "
            "targets); student 1 iterations per target") in printed
    assert "tome: no selection and no training (training-free)" in printed
    assert "1 row(s) done" not in printed and "2 row(s) done" in printed, "teacher and tome"
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [r["method"] for r in rows] == ["teacher", "tome", "practise"]
    assert (out / "sweep.png").is_file()

    calls.clear()
    assert main([*argv, "--overwrite"]) == 0 and calls == ["tome", "practise"]
    assert len(list(csv.DictReader(open(out / "sweep.csv")))) == 3
