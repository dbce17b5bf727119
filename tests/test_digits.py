"""The digits splits, their PNG export (round trip through the image-folder loader), and
the demo teacher's cache logic on a reduced one-epoch configuration (the full teacher is
never trained in tests)."""
import json
import warnings

import pytest
import torch

from dcvit_engine.data import load_image_folder
from dcvit_engine.demo_teacher import DemoTeacherConfig, default_cache_dir, demo_teacher
from dcvit_engine.digits import DIGITS_MEAN, DIGITS_STD, digits_splits, export_digits_folder

TINY = DemoTeacherConfig(img_size=16, patch_size=8, embed_dim=12, depth=1, num_heads=3, epochs=1,
                         batch_size=64, max_shift=1)


def test_split_sizes_stratified_and_fixed():
    train_x, train_y, test_x, test_y = digits_splits(32)
    assert train_x.shape == (1347, 3, 32, 32) and test_x.shape == (450, 3, 32, 32)
    assert train_y.dtype == torch.long and set(train_y.tolist()) == set(range(10))
    assert test_y.bincount().min() >= 44  # every class is held out at about 25%
    assert abs(float(train_x.mean())) < 0.1 and abs(float(train_x.std()) - 1) < 0.1
    again = digits_splits(32)
    assert torch.equal(again[0], train_x) and torch.equal(again[3], test_y)
    other = digits_splits(16, seed=1)
    assert other[0].shape[-1] == 16 and not torch.equal(other[3], test_y[: len(other[3])])
    with pytest.raises(ValueError, match="img_size"):
        digits_splits(4)


def test_export_round_trip_and_reuse(tmp_path):
    root = export_digits_folder(tmp_path / "digits", split="test", img_size=16)
    data = load_image_folder(root, 16, DIGITS_MEAN, DIGITS_STD)
    assert data.classes == [str(d) for d in range(10)] and len(data) == 450
    images, labels = data.tensors()
    _, _, test_x, test_y = digits_splits(16)
    assert torch.equal(labels.sort().values, test_y.sort().values)
    # files are named by their index in the dataset and listed sorted per class, as the split is
    order = sorted(range(450), key=lambda i: (int(test_y[i]), i))
    error = (images - test_x[order]).abs().max()
    assert error <= 0.5 / 255 / DIGITS_STD[0] + 1e-6  # 8-bit rounding only
    assert export_digits_folder(root, split="test", img_size=16) == root  # same settings: reused
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_digits_folder(root, split="train", img_size=16)
    few = export_digits_folder(root, split="train", img_size=16, per_class=2, overwrite=True)
    assert len(load_image_folder(few, 16)) == 20
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_export_bad_input(tmp_path):
    with pytest.raises(ValueError, match="split"):
        export_digits_folder(tmp_path / "d", split="val")
    with pytest.raises(ValueError, match="per_class"):
        export_digits_folder(tmp_path / "d", per_class=0)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file.txt").write_text("x")
    with pytest.raises(FileExistsError):
        export_digits_folder(tmp_path / "taken")


def test_demo_teacher_cache(tmp_path, monkeypatch):
    model, info = demo_teacher(cache_dir=tmp_path, config=TINY, progress=False)
    assert not info["from_cache"] and info["model_kwargs"]["embed_dim"] == 12
    assert 0 <= info["test_top1"] <= 100 and info["train_seconds"] > 0
    assert model.pretrained_cfg["mean"] == DIGITS_MEAN and not model.training
    saved = json.loads((tmp_path / info["path"].split("/")[-1] / "info.json").read_text())
    assert saved["test_top1"] == info["test_top1"]

    cached, cached_info = demo_teacher(cache_dir=tmp_path, config=TINY, progress=False)
    assert cached_info["from_cache"] and cached_info["test_top1"] == info["test_top1"]
    x = digits_splits(16)[2][:8]
    with torch.no_grad():
        assert torch.equal(cached(x), model(x))

    monkeypatch.setenv("DCVIT_CACHE", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    retrained, retrained_info = demo_teacher(config=TINY, progress=False)
    assert not retrained_info["from_cache"] and retrained_info["path"].startswith(str(tmp_path / "env"))
    with torch.no_grad():
        assert torch.equal(retrained(x), model(x))  # seeded: the same weights again

    (tmp_path / info["path"].split("/")[-1] / "model.safetensors").write_bytes(b"garbage")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, repaired = demo_teacher(cache_dir=tmp_path, config=TINY, progress=False)
    assert not repaired["from_cache"] and "unusable" in str(caught[0].message)
    assert demo_teacher(cache_dir=tmp_path, config=TINY, progress=False)[1]["from_cache"]
    assert not demo_teacher(cache_dir=tmp_path, config=TINY, force=True, progress=False)[1]["from_cache"]
