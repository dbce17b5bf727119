"""`dcvit sweep`: every method/target row evaluated on the engine, a table, CSV and PNG."""
import csv

import pytest

from dcvit_engine.cli import main
from dcvit_engine.digits import DIGITS_MEAN, DIGITS_STD, export_digits_folder

MODEL_KWARGS = '{"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 3, "num_classes": 10}'


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
                   "--batch-size", "8", *norm, "--out", str(out)])
    assert status == 0
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 5 and "method" in table[0], "header, rule, one line per row"
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [r["method"] for r in rows] == ["teacher", "tome", "tome", "practise", "practise"]
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
