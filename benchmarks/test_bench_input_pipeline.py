"""bench_input_pipeline at tiny sizes (a few small JPEGs, a 2-block 32x32 ViT): it writes its
JPEGs, times every CPU row, and its CSV holds measured, finite rates and PIL differences
within the tensor path's bound (tests/test_preprocess.py)."""
import csv
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_input_pipeline import main  # noqa: E402


def test_small_run_writes_csv(tmp_path, capsys):
    code = main(["--device", "cpu", "--out", str(tmp_path), "--model", "deit_tiny_patch16_224",
                 "--model-kwargs", '{"img_size": 32, "depth": 2, "num_classes": 10}', "--batch-size", "4",
                 "--dtype", "float32", "--images", "6", "--core-images", "3", "--workers", "0",
                 "--backend", "torch"])
    assert code == 0
    with open(tmp_path / "input_pipeline.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    runners = [r["runner"] for r in rows]
    assert runners == ["PIL (timm)", "torchvision+torch (dcvit cpu path)", "engine alone",
                       "dcvit infer --decode cpu (0 workers)"]
    for r in rows:
        assert math.isfinite(float(r["images_per_s"])) and float(r["images_per_s"]) > 0
    project = rows[1]
    assert int(project["max_diff_levels"]) <= 2 and float(project["differing_fraction"]) < 0.02
    assert len(list((tmp_path / "input_pipeline_images").glob("*.jpg"))) == 6
    assert "of the engine alone" in capsys.readouterr().out
