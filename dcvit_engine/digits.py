"""scikit-learn's handwritten digits as a tiny, offline image-classification set.

1797 real 8x8 grayscale digits (values 0..16), upsampled bilinearly to the model's
input size and replicated to three channels, with a fixed stratified 75/25
train/test split.  They give the demo a real (if small) task without any
download, and ``export_digits_folder`` writes them as PNG files so the CLI can be
pointed at an ordinary image folder.

Layer 1: imports nothing from the package above layer 1.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .atomic import atomic_folder
from .errors import InputError
from .jsonfile import load_json_file

DIGITS_MEAN = (0.3, 0.3, 0.3)   # pixel mean of the upsampled digits in [0, 1], rounded
DIGITS_STD = (0.33, 0.33, 0.33)  # pixel std at 16..32 px, rounded
DIGITS_NUM_CLASSES = 10
TEST_FRACTION = 0.25
_EXPORT_MANIFEST = "digits_export.json"


@functools.lru_cache(maxsize=1)  # parsing scikit-learn's CSV costs about a second
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits as float images in [0, 1], shape (N, 8, 8), and their labels (read-only)."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    bunch = load_digits()
    images, labels = bunch.images.astype(np.float32) / 16.0, bunch.target.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def _split_indices(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test indices: the same TEST_FRACTION of every class is held out."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for digit in range(DIGITS_NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == digit))
        n_test = int(round(len(members) * TEST_FRACTION))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _check_size(img_size: int) -> None:
    if not isinstance(img_size, int) or img_size < 8:
        raise InputError(f"img_size must be an int >= 8 (the digits are 8x8), got {img_size!r}")


def _upsample(images: np.ndarray, img_size: int) -> torch.Tensor:
    """(N, 8, 8) in [0, 1] -> (N, 1, S, S) in [0, 1], bilinear."""
    x = torch.tensor(images).unsqueeze(1)
    return F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False).clamp_(0, 1)


def normalize_digits(pixels: torch.Tensor) -> torch.Tensor:
    """(N, 1, S, S) pixels in [0, 1] -> (N, 3, S, S) normalized with DIGITS_MEAN / DIGITS_STD."""
    mean = torch.tensor(DIGITS_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(DIGITS_STD).view(1, 3, 1, 1)
    return (pixels.expand(-1, 3, -1, -1) - mean) / std


def digits_splits(img_size: int = 32, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_x, train_y, test_x, test_y): float (N, 3, S, S) normalized images, long labels.

    The split is stratified and fixed by seed: 1347 train and 450 test images.
    """
    _check_size(img_size)
    images, labels = _raw_digits()
    train, test = _split_indices(labels, seed)
    pixels = _upsample(images, img_size)
    x = normalize_digits(pixels)
    y = torch.tensor(labels)
    return x[train].contiguous(), y[train], x[test].contiguous(), y[test]


def export_digits_folder(root: str | os.PathLike, split: str = "train", img_size: int = 32,
                         seed: int = 0, per_class: int | None = None, overwrite: bool = False) -> Path:
    """Write one split as PNGs in class subfolders root/0 .. root/9 and return root.

    The images are the same upsampled pixels that digits_splits normalizes, stored
    as 8-bit grayscale at img_size, so loading the folder with DIGITS_MEAN/STD gives
    digits_splits' tensors up to 8-bit rounding.  per_class keeps only the first
    images of every class (a few-shot folder).  The folder is built in a temporary
    sibling and renamed into place, so an interrupted export leaves nothing behind.
    An existing export with the same settings is reused; anything else at root is
    an error unless overwrite=True.
    """
    if split not in ("train", "test"):
        raise InputError(f"split must be 'train' or 'test', got {split!r}")
    _check_size(img_size)
    if per_class is not None and per_class <= 0:
        raise InputError(f"per_class must be positive, got {per_class}")
    root = Path(root).expanduser()
    settings = {"split": split, "img_size": img_size, "seed": seed, "per_class": per_class}
    if root.exists():
        manifest = root / _EXPORT_MANIFEST
        if not overwrite:
            if manifest.is_file() and load_json_file(manifest, expect=None) == settings:
                return root
            if root.is_file() or any(root.iterdir()):
                raise FileExistsError(
                    f"{root} already exists and is not a digits export with these settings; "
                    "choose another folder or pass overwrite=True")

    images, labels = _raw_digits()
    train, test = _split_indices(labels, seed)
    indices = train if split == "train" else test
    pixels = _upsample(images[indices], img_size).squeeze(1)
    as_bytes = (pixels * 255.0).round().to(torch.uint8).numpy()

    with atomic_folder(root) as staging:
        written = [0] * DIGITS_NUM_CLASSES
        for image, index in zip(as_bytes, indices):
            digit = int(labels[index])
            if per_class is not None and written[digit] >= per_class:
                continue
            folder = staging / str(digit)
            folder.mkdir(exist_ok=True)
            Image.fromarray(image).save(folder / f"{int(index):04d}.png")
            written[digit] += 1
        (staging / _EXPORT_MANIFEST).write_text(json.dumps(settings))
    return root
