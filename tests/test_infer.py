"""Batched and data-parallel inference over an image folder, and `dcvit infer`."""
import csv
import os
import socket

import numpy as np
import pytest
import timm
import torch
import torch.multiprocessing as mp
from PIL import Image
from sklearn.datasets import load_digits

from dcvit_engine import artifact
from dcvit_engine.cli import main as cli_main
from dcvit_engine.data import load_image_folder
from dcvit_engine.engine import build_engine
from dcvit_engine.infer import ShardSampler, run_inference
from dcvit_engine.reference import reference_from_timm

NUM_IMAGES = 13  # odd, so two ranks get different counts and batches end partially


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """13 digit images as PNGs in class subfolders (labels 0..4), plus a non-image file."""
    root = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    for i in range(NUM_IMAGES):
        label = int(digits.target[i]) % 5
        folder = root / f"class_{label}"
        folder.mkdir(exist_ok=True)
        pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
        Image.fromarray(pixels).resize((16, 16)).save(folder / f"img_{i:02d}.png")
    (root / "class_0" / "notes.txt").write_text("not an image, skipped by extension")
    return root


@pytest.fixture(scope="module")
def model_artifact(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=48, depth=2, num_heads=3, num_classes=5).eval()
    path = tmp_path_factory.mktemp("artifact") / "tiny"
    artifact.save(model, path)
    return path


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_shard_sampler_partitions_without_duplicates():
    shards = [list(ShardSampler(NUM_IMAGES, rank, 3)) for rank in range(3)]
    assert sorted(sum(shards, [])) == list(range(NUM_IMAGES))
    assert [len(ShardSampler(NUM_IMAGES, rank, 3)) for rank in range(3)] == [5, 4, 4]


def test_predictions_match_the_engine(digits_folder, model_artifact, tmp_path):
    out = tmp_path / "preds.csv"
    result = run_inference(model_artifact, digits_folder, out, batch_size=4, num_workers=0,
                           progress=False, class_names=[f"c{i}" for i in range(5)])
    rows = read_csv(out)
    assert len(rows) == NUM_IMAGES == result.num_images
    assert list(rows[0]) == ["path", "predicted", "predicted_name", "probability", "label", "label_index"]
    assert os.listdir(tmp_path) == ["preds.csv"], "no temporary file may be left behind"

    engine = build_engine(model_artifact)
    folder = load_image_folder(digits_folder, artifact.load_preprocess(model_artifact))  # PNGs: PIL's path
    images, labels = folder.tensors()
    probs = engine(images).softmax(dim=-1)
    for row, p, label, path in zip(rows, probs, labels, folder.paths):
        assert row["path"] == path.relative_to(digits_folder).as_posix()
        assert int(row["predicted"]) == int(p.argmax())
        assert row["predicted_name"] == f"c{int(p.argmax())}"
        assert float(row["probability"]) == pytest.approx(float(p.max()), abs=1e-5)
        assert int(row["label_index"]) == int(label) and row["label"] == f"class_{int(label)}"
    agreement = sum(int(r["predicted"]) == int(r["label_index"]) for r in rows) / NUM_IMAGES
    assert result.accuracy == pytest.approx(agreement)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, model_path, data, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    result = run_inference(model_path, data, out, batch_size=3, num_workers=0, progress=False,
                           device="cpu")
    # rank 0 reports every image it gathered, the others their own shard
    assert result.num_images == (NUM_IMAGES if rank == 0 else len(range(rank, NUM_IMAGES, world_size)))
    assert (result.out_path is not None) == (rank == 0)


def test_two_gloo_processes_predict_each_image_once(digits_folder, model_artifact, tmp_path):
    single = tmp_path / "single.csv"
    run_inference(model_artifact, digits_folder, single, batch_size=3, num_workers=0, progress=False)
    parallel = tmp_path / "parallel.csv"
    mp.spawn(_rank_main, args=(2, _free_port(), str(model_artifact), str(digits_folder), str(parallel)),
             nprocs=2, join=True)
    rows, expected = read_csv(parallel), read_csv(single)
    assert [r["path"] for r in rows] == [r["path"] for r in expected]  # each image once, in order
    for row, ref in zip(rows, expected):
        assert row["predicted"] == ref["predicted"]
        assert float(row["probability"]) == pytest.approx(float(ref["probability"]), abs=1e-5)


def test_bad_folders(tmp_path, model_artifact):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image files"):
        run_inference(model_artifact, empty, tmp_path / "p.csv", progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "fake.png").write_text("this is text, not a PNG")
    with pytest.raises(ValueError, match="fake.png is not a readable image"):
        run_inference(model_artifact, broken, tmp_path / "p.csv", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_inference(model_artifact, tmp_path / "missing", tmp_path / "p.csv", progress=False)
    assert not (tmp_path / "p.csv").exists()


def test_bad_arguments(digits_folder, model_artifact, tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        run_inference(model_artifact, digits_folder, tmp_path / "p.csv", batch_size=0)
    with pytest.raises(ValueError, match="3 class names given but the model has 5"):
        run_inference(model_artifact, digits_folder, tmp_path / "p.csv", class_names=["a", "b", "c"])
    headless = reference_from_timm(timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48, depth=1,
        num_heads=3, num_classes=0))
    with pytest.raises(ValueError, match="no classification head"):
        run_inference(headless, digits_folder, tmp_path / "p.csv", progress=False)


def test_cli_infer(digits_folder, model_artifact, tmp_path, capsys):
    out = tmp_path / "cli.csv"
    code = cli_main(["infer", str(model_artifact), "--data", str(digits_folder), "--out", str(out),
                     "--batch-size", "5", "--num-workers", "0", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"predicted {NUM_IMAGES} images" in printed and "agreement" in printed
    rows = read_csv(out)
    assert len(rows) == NUM_IMAGES
    # the folder has as many class subfolders as the model has classes: they name the predictions
    assert "columns: path: image path under the folder; predicted: top-1 class index" in printed
    assert "predicted_name: the predicted class's name, from the folder's class subfolders" in printed
    assert all(r["predicted_name"] == f"class_{r['predicted']}" for r in rows)


def test_cli_infer_errors_are_one_line(digits_folder, model_artifact, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = cli_main(["infer", str(model_artifact), "--data", str(empty), "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("dcvit infer: error: no image files") and err.count("\n") == 1
    code = cli_main(["infer", "--model", "vit_tiny_patch16_224", "--model-kwargs", '{"img_size": 32',
                     "--data", str(digits_folder), "--out", str(tmp_path / "p.csv")])
    assert code == 2 and "JSON" in capsys.readouterr().err


def test_nonfinite_images_and_outputs_are_refused_and_nothing_written(digits_folder, model_artifact,
                                                                       tmp_path, capsys):
    out = tmp_path / "nan.csv"
    # a NaN mean is refused with the preprocessing config, before any image is read; no CSV
    code = cli_main(["infer", str(model_artifact), "--data", str(digits_folder), "--out", str(out),
                     "--mean", "nan,0.5,0.5", "--batch-size", "5", "--num-workers", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "preprocessing mean must be finite" in err
    assert not out.exists()
    # finite images, but a model whose forward is NaN
    model = artifact.load(model_artifact)
    with torch.no_grad():
        model.blocks[1].mlp.fc2.bias[3] = float("nan")
    with pytest.raises(ValueError, match=f"NaN or Inf outputs on {NUM_IMAGES} of {NUM_IMAGES} images"):
        run_inference(model, digits_folder, out, backend="torch", batch_size=5, num_workers=0, progress=False)
    assert not out.exists()


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """JPEGs of several sizes (RGB, grey, CMYK: nvJPEG's and PIL's paths) and PNGs, in classes."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    images = [(50, 37, "RGB", "jpg"), (37, 50, "L", "jpg"), (45, 30, "CMYK", "jpg"), (40, 64, "RGB", "png"),
              (33, 33, "RGB", "jpg"), (80, 45, "RGB", "jpg"), (29, 41, "P", "png")]
    for i, (w, h, mode, ext) in enumerate(images):
        coarse = Image.fromarray(rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8))
        image = coarse.resize((w, h), Image.BICUBIC)
        image = image.quantize(16) if mode == "P" else image.convert(mode)
        folder = root / f"class_{i % 3}"
        folder.mkdir(exist_ok=True)
        image.save(folder / f"img_{i}.{ext}", **({"quality": 90} if ext == "jpg" else {}))
    return root


def test_device_decode_path_equals_worker_path_on_cpu(mixed_folder, model_artifact, tmp_path):
    """The GPU code path (batched decode in the main process) run with device cpu gives the CSV
    the CPU worker path gives; both within the tensor path's bound of PIL's probabilities."""
    out = {}
    for decode in ("device", "cpu"):
        out[decode] = tmp_path / f"{decode}.csv"
        run_inference(model_artifact, mixed_folder, out[decode], batch_size=3, num_workers=0, progress=False,
                      decode=decode, backend="torch")
    assert read_csv(out["device"]) == read_csv(out["cpu"])
    exact = load_image_folder(mixed_folder, artifact.load_preprocess(model_artifact))
    probs = build_engine(model_artifact, backend="torch")(exact.tensors()[0]).softmax(-1)
    for row, p in zip(read_csv(out["cpu"]), probs):
        assert float(row["probability"]) == pytest.approx(float(p.max()), abs=2e-2)


def test_cli_preprocessing_overrides(mixed_folder, model_artifact, tmp_path, capsys):
    out = tmp_path / "p.csv"
    code = cli_main(["infer", str(model_artifact), "--data", str(mixed_folder), "--out", str(out),
                     "--crop-pct", "1.0", "--interpolation", "bilinear", "--mean", "0.5", "--std", "0.25",
                     "--num-workers", "0", "--no-progress", "--decode", "device"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "bilinear, crop_pct 1 (center), mean (0.5, 0.5, 0.5), std (0.25, 0.25, 0.25)" in printed
    for bad, message in ((["--crop-pct", "0"], "crop_pct must be in (0, 1]"),
                         (["--crop-pct", "1.2"], "crop_pct must be in (0, 1]"),
                         (["--std", "0.5,0,0.5"], "std must be positive")):
        code = cli_main(["infer", str(model_artifact), "--data", str(mixed_folder), "--out", str(out), *bad])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err, err


def test_corrupt_jpeg_fails_in_one_line_naming_it(mixed_folder, tmp_path, model_artifact, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    good = next(mixed_folder.rglob("*.jpg")).read_bytes()
    (folder / "a.jpg").write_bytes(good)
    (folder / "b.jpg").write_bytes(good[:300])  # the header is intact, the scan is cut
    for decode in ("device", "cpu"):
        code = cli_main(["infer", str(model_artifact), "--data", str(folder), "--out",
                         str(tmp_path / "p.csv"), "--num-workers", "0", "--no-progress", "--decode", decode])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "b.jpg is not a readable image" in err, err
