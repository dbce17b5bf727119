"""`dcvit compress` on a tiny random ViT and a labeled few-shot digits folder, shared by
the method tests."""
import json

from dcvit_engine.cli import main
from dcvit_engine.compress.api import method_options
from dcvit_engine.digits import DIGITS_MEAN, DIGITS_STD, export_digits_folder

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 3, "num_classes": 10}


def run_compress_cli(capsys, tmp_path, method, *extra):
    """Runs the command in-process; returns (exit status, stdout, stderr). A method without a
    batch size (ToMe) is not given one: the CLI refuses options a method does not take."""
    digits = export_digits_folder(tmp_path / "digits", per_class=2)
    rc = main(["compress", "--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(TINY_VIT),
               "--data", str(digits), "--num-samples", "12", "--method", method, "--target-macs", "0.6",
               "--mean", str(DIGITS_MEAN[0]), "--std", str(DIGITS_STD[0]),
               *(["--batch-size", "8"] if "batch_size" in method_options(method) else []),
               "--device", "cpu", "--out", str(tmp_path / method), *extra])
    out, err = capsys.readouterr()
    return rc, out, err
