"""Few-shot image folders: the images a compression method sees.

A folder is either flat (``root/*.png``: unlabeled) or holds one subfolder per
class (``root/<class>/*.png``: labeled, class index = position of the subfolder
in sorted order, as torchvision's ImageFolder does).  Images are read with PIL,
converted to RGB (or grayscale for one input channel) and preprocessed with the
model's PreprocessConfig (preprocess.py: timm's evaluation transform).

Layer 1: imports only preprocess.py (layer 1 too).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dcvit_engine.errors import InputError

from .preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreprocessConfig,
    normalize,
    open_image,
    pil_pixels,
    pil_preprocess,
)

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
UNLABELED = -1


def nonfinite_mask(values: torch.Tensor) -> torch.Tensor:
    """(N,) bool: which items (entries along dim 0: images, or images' outputs) hold a NaN or
    Inf. Stays on the values' device (no synchronisation)."""
    if values.numel() == 0:
        return torch.zeros(values.shape[0], dtype=torch.bool, device=values.device)
    return (~torch.isfinite(values.detach())).reshape(values.shape[0], -1).any(1)


def nonfinite_rows(values: torch.Tensor) -> int:
    """How many items (entries along dim 0) hold a NaN or Inf."""
    return int(nonfinite_mask(values).sum())


def refuse_nonfinite(total: int, bad_images: int = 0, bad_outputs: int = 0, model: str = "the model") -> None:
    """The one check every command shares (compress, eval, infer): images with NaN/Inf, or a
    model whose outputs are NaN/Inf on them, are refused with a one-line ValueError naming
    how many of the `total` images are affected."""
    if bad_images:
        raise InputError(f"{bad_images} of {total} images hold NaN or Inf values; replace them "
                         "(or check the normalisation mean/std)")
    if bad_outputs:
        raise InputError(f"{model} gives NaN or Inf outputs on {bad_outputs} of {total} images; "
                         "check its weights (checkpoint)")


def check_finite(images: torch.Tensor, outputs: torch.Tensor | None = None, model: str = "the model") -> None:
    """refuse_nonfinite for whole tensors: images (N, ...) and, optionally, outputs (N, ...)."""
    refuse_nonfinite(images.shape[0], nonfinite_rows(images),
                     0 if outputs is None else nonfinite_rows(outputs), model)


def _is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_image_file(p))


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _size_pair(img_size: int | Sequence[int]) -> tuple[int, int]:
    """(H, W) from an int or a pair; rejects non-positive sizes."""
    if isinstance(img_size, int):
        size = (img_size, img_size)
    else:
        size = tuple(int(s) for s in img_size)
    if len(size) != 2 or min(size) <= 0:
        raise InputError(f"img_size must be a positive int or an (H, W) pair, got {img_size!r}")
    return size  # type: ignore[return-value]


def _folder_config(img_size, mean, std, in_chans) -> PreprocessConfig:
    """The PreprocessConfig given, or the plain squash for a bare size (see ImageFolderData)."""
    if isinstance(img_size, PreprocessConfig):
        if mean is not None or std is not None or in_chans not in (None, img_size.channels):
            raise InputError("a PreprocessConfig carries its own mean, std and channels; change them "
                             "with config.replace(mean=..., std=...)")
        return img_size
    in_chans = 3 if in_chans is None else in_chans
    if in_chans not in (1, 3):
        raise InputError(f"in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans}")
    return PreprocessConfig((in_chans, *_size_pair(img_size)), interpolation="bilinear", crop_pct=1.0,
                            crop_mode="squash", mean=IMAGENET_MEAN if mean is None else mean,
                            std=IMAGENET_STD if std is None else std)


def _scan_folder(root: Path, labeled: bool | str) -> tuple[list[Path], list[int], list[str] | None]:
    """Image paths, their labels (UNLABELED when unlabeled) and the class names."""
    accepted = ", ".join(IMAGE_EXTENSIONS)
    top_images = _image_files(root)
    class_dirs = [d for d in _class_folders(root) if _image_files(d)]
    if labeled == "auto":
        if top_images and class_dirs:
            raise InputError(
                f"{root} holds both images and class subfolders with images; pass labeled=True "
                "(use only the subfolders) or labeled=False (use every image, no labels)")
        labeled = bool(class_dirs)
    elif not isinstance(labeled, bool):
        raise InputError(f"labeled must be True, False or 'auto', got {labeled!r}")

    if labeled:
        if not class_dirs:
            raise InputError(
                f"labeled=True needs one subfolder per class with images in it, but {root} has none "
                f"(accepted extensions: {accepted})")
        classes = [d.name for d in class_dirs]
        paths, labels = [], []
        for index, folder in enumerate(class_dirs):
            files = _image_files(folder)
            paths += files
            labels += [index] * len(files)
        return paths, labels, classes

    paths = top_images + [p for d in class_dirs for p in _image_files(d)]
    if not paths:
        raise InputError(
            f"no image files in {root} nor in its subfolders (accepted extensions: {accepted})")
    return paths, [UNLABELED] * len(paths), None


class ImageFolderData(Dataset):
    """Images of a folder, preprocessed; items are (image (C, H, W), label or -1).

    img_size is the model's PreprocessConfig (timm's evaluation transform: resize, center
    crop, normalise; mean/std are then part of it) or, for a bare input size, the plain
    squash: a bilinear resize to that size, normalised with mean/std (ImageNet's by default).

    num_samples picks a random subset (reproducible by seed) of that many images;
    asking for more images than the folder holds is an error rather than a silent
    shortfall, because few-shot results depend on the exact count.
    """

    def __init__(self, root: str | os.PathLike, img_size: PreprocessConfig | int | Sequence[int],
                 mean: float | Sequence[float] | None = None,
                 std: float | Sequence[float] | None = None,
                 num_samples: int | None = None, seed: int = 0,
                 labeled: bool | str = "auto", in_chans: int | None = None):
        root = Path(root).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"image folder {root} does not exist")
        if not root.is_dir():
            raise NotADirectoryError(f"{root} is a file; pass the folder that holds the images")
        self.root = root
        self.config = _folder_config(img_size, mean, std, in_chans)
        self.size, self.in_chans = self.config.size, self.config.channels

        paths, labels, self.classes = _scan_folder(root, labeled)
        self.labeled = self.classes is not None
        if num_samples is not None:
            if num_samples <= 0:
                raise InputError(f"num_samples must be positive, got {num_samples}")
            if num_samples > len(paths):
                raise InputError(
                    f"asked for {num_samples} images but {root} holds only {len(paths)}; "
                    "pass a smaller num_samples or add images")
            generator = torch.Generator().manual_seed(seed)
            chosen = sorted(torch.randperm(len(paths), generator=generator)[:num_samples].tolist())
            paths = [paths[i] for i in chosen]
            labels = [labels[i] for i in chosen]
        self.paths = paths
        self.labels = labels
        for path in self.paths:  # header check only: a broken file fails here, by name, not mid-run
            self._open(path).close()

    @staticmethod
    def _open(path: Path) -> Image.Image:
        return open_image(path)  # the one place that names a broken file or a decompression bomb

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> torch.Tensor:
        """The normalized image at index, shape (in_chans, H, W), float32."""
        path = self.paths[index]
        with self._open(path) as image:
            try:
                pixels = pil_preprocess(image, self.config)
            except OSError as err:  # truncated files pass the header check and fail on decode
                raise InputError(f"{path} is not a readable image ({err}); remove or replace it") from None
            return normalize(pil_pixels(pixels), self.config)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.load(index), self.labels[index]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image stacked (N, C, H, W) and the labels (N,) (-1 when unlabeled)."""
        images = torch.stack([self.load(i) for i in range(len(self))])
        return images, torch.tensor(self.labels, dtype=torch.long)

    def loader(self, batch_size: int = 64, shuffle: bool = False, num_workers: int = 0,
               seed: int = 0, drop_last: bool = False) -> DataLoader:
        return make_loader(self, batch_size, shuffle, num_workers, seed, drop_last)


def make_loader(dataset: Dataset, batch_size: int = 64, shuffle: bool = False, num_workers: int = 0,
                seed: int = 0, drop_last: bool = False) -> DataLoader:
    """A DataLoader with pinned memory when CUDA is available and a seeded shuffle."""
    if batch_size <= 0:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    if num_workers < 0:
        raise InputError(f"num_workers must be >= 0, got {num_workers}")
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), drop_last=drop_last,
                      generator=torch.Generator().manual_seed(seed),
                      persistent_workers=num_workers > 0)


def load_image_folder(root: str | os.PathLike, img_size: PreprocessConfig | int | Sequence[int],
                      mean: float | Sequence[float] | None = None,
                      std: float | Sequence[float] | None = None,
                      num_samples: int | None = None, seed: int = 0,
                      labeled: bool | str = "auto", in_chans: int | None = None) -> ImageFolderData:
    """The images of root as an ImageFolderData (see its docstring)."""
    return ImageFolderData(root, img_size, mean, std, num_samples, seed, labeled, in_chans)


def sample_images(root: str | os.PathLike, n: int, img_size: PreprocessConfig | int | Sequence[int] = 224,
                  mean: float | Sequence[float] | None = None,
                  std: float | Sequence[float] | None = None,
                  seed: int = 0, labeled: bool | str = "auto", in_chans: int | None = None) -> torch.Tensor:
    """n few-shot images of root, chosen at random (seeded), as one (n, C, H, W) tensor."""
    data = ImageFolderData(root, img_size, mean, std, n, seed, labeled, in_chans)
    return data.tensors()[0]
