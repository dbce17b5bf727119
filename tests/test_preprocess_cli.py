"""The preprocessing config through the commands: `dcvit compress` stores the teacher's
(with the user's overrides) in the artifact, `dcvit info` shows it for an artifact and a timm
name, `dcvit eval` uses and reports it, and an old artifact without it gets a one-line notice."""
import json

from compress_cli import run_compress_cli
from dcvit_engine.artifact import PREPROCESS_FILENAME, load
from dcvit_engine.cli import main


def test_compress_stores_config_info_and_eval_show_it(capsys, tmp_path):
    rc, out, err = run_compress_cli(capsys, tmp_path, "tome", "--crop-pct", "1.0",
                                    "--interpolation", "bilinear")
    assert rc == 0, err
    artifact = tmp_path / "tome"
    stored = json.loads((artifact / PREPROCESS_FILENAME).read_text())
    # vit_tiny_patch16_224's pretrained_cfg: bicubic, 0.9, 0.5/0.5; the overrides and the digits
    # statistics given on the command line replace their fields; the input is the model's 32x32
    assert stored["input_size"] == [3, 32, 32] and stored["crop_mode"] == "center"
    assert (stored["crop_pct"], stored["interpolation"]) == (1.0, "bilinear")
    assert load(artifact).preprocess.to_dict() == stored
    assert "preprocessing: 32x32 (3 ch), bilinear, crop_pct 1 (center)" in out

    assert main(["info", str(artifact), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["preprocess"] == stored
    assert main(["info", "--model", "vit_tiny_patch16_224", "--model-kwargs", '{"img_size": 32}']) == 0
    printed = capsys.readouterr().out
    assert "preprocessing: 32x32 (3 ch), bicubic, crop_pct 0.9 (center), mean (0.5, 0.5, 0.5)" in printed

    digits = tmp_path / "digits"
    assert main(["eval", str(artifact), "--data", str(digits), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["preprocess"] == stored
    assert main(["eval", str(artifact), "--data", str(digits), "--device", "cpu", "--crop-pct", "0.5"]) == 0
    assert "crop_pct 0.5" in capsys.readouterr().out

    (artifact / PREPROCESS_FILENAME).unlink()  # as saved before artifacts carried it
    assert main(["info", str(artifact)]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "ImageNet default" in captured.err
    assert "bicubic, crop_pct 0.875 (center), mean (0.485, 0.456, 0.406)" in captured.out


def test_impossible_override_is_one_line(capsys, tmp_path):
    rc, _, err = run_compress_cli(capsys, tmp_path, "tome", "--crop-pct", "-0.1")
    assert rc == 2 and err.count("\n") == 1 and "crop_pct must be in (0, 1]" in err
    assert not (tmp_path / "tome").exists()
