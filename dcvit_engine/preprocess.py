"""How a model wants its images: timm's evaluation transform as data, and two ways to apply it.

A PreprocessConfig holds what timm's `resolve_data_config` resolves for a model (input size,
interpolation, crop_pct, crop mode, mean, std). Applying it follows timm's
`transforms_imagenet_eval` step by step: resize (the shorter side to floor(size / crop_pct),
or every side in "squash" mode), center crop to the input size, scale to [0, 1], normalise.

- `pil_to_tensor` does it with PIL exactly as timm does (equal to timm's transform within
  float rounding): the path of compress, eval, sweep and reproduce.
- `decode_uint8` + `resize_crop_uint8` + `normalize` do it on uint8 tensors on any device
  (torchvision's JPEG decoder, torch's antialiased resize): the path of `dcvit infer`, on the
  CPU in DataLoader workers or batched on the GPU (nvJPEG). The decoded pixels equal PIL's;
  the resize may differ from PIL's by one 8-bit level on a few pixels (PIL rounds to uint8
  between its horizontal and vertical passes), bounded in tests/test_preprocess.py.
  Images the tensor decoder cannot take (PNG and other formats, CMYK JPEGs, files it
  rejects) are decoded by PIL instead, per image.

Layer 1: imports nothing from the package.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .errors import InputError, ResourceLimitError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875  # timm's default when a model names none
PIL_INTERPOLATIONS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                      "box": Image.BOX, "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}
# Interpolations torch resizes like PIL (antialiased, PIL's kernels); others take the PIL path.
TENSOR_INTERPOLATIONS = ("bilinear", "bicubic")
# timm's "border" mode (letterbox with the mean colour) is not implemented: refused by name.
CROP_MODES = ("center", "squash")
FIELDS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")


def _stats(values, channels: int, name: str) -> tuple[float, ...]:
    try:
        stats = tuple(float(v) for v in ((values,) if isinstance(values, (int, float)) else values))
    except (TypeError, ValueError):
        raise InputError(f"preprocessing {name} must be numbers, got {values!r}") from None
    if len(stats) == 1 and channels > 1:
        stats = stats * channels
    if len(stats) != channels:
        raise InputError(f"preprocessing {name} has {len(stats)} values but the model takes {channels} "
                         "channels")
    if not all(math.isfinite(v) for v in stats):
        raise InputError(f"preprocessing {name} must be finite, got {stats}")
    if name == "std" and min(stats) <= 0:
        raise InputError(f"preprocessing std must be positive, got {stats}")
    return stats


@dataclass(frozen=True)
class PreprocessConfig:
    """One model's evaluation preprocessing; validated on construction (a bad value is a
    ValueError naming the field)."""
    input_size: tuple[int, int, int]  # (channels, height, width)
    interpolation: str = "bicubic"
    crop_pct: float = DEFAULT_CROP_PCT
    crop_mode: str = "center"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self):
        try:
            size = tuple(int(s) for s in self.input_size)
        except (TypeError, ValueError):
            size = ()
        if len(size) != 3 or min(size) <= 0 or size[0] not in (1, 3):
            raise InputError(f"preprocessing input_size must be (channels 1 or 3, height, width) with "
                             f"positive sizes, got {self.input_size!r}")
        object.__setattr__(self, "input_size", size)
        if self.interpolation not in PIL_INTERPOLATIONS:
            raise InputError(f"preprocessing interpolation {self.interpolation!r} is unknown; choose from "
                             f"{', '.join(PIL_INTERPOLATIONS)}")
        if isinstance(self.crop_pct, bool) or not isinstance(self.crop_pct, (int, float)) \
                or not 0 < self.crop_pct <= 1:
            raise InputError(f"preprocessing crop_pct must be in (0, 1] (the fraction of the resized "
                             f"image kept by the center crop), got {self.crop_pct!r}")
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        if self.crop_mode not in CROP_MODES:
            raise InputError(f"preprocessing crop_mode {self.crop_mode!r} is not supported; choose from "
                             f"{', '.join(CROP_MODES)}")
        object.__setattr__(self, "mean", _stats(self.mean, size[0], "mean"))
        object.__setattr__(self, "std", _stats(self.std, size[0], "std"))

    @property
    def channels(self) -> int:
        return self.input_size[0]

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the model's input."""
        return self.input_size[1], self.input_size[2]

    def replace(self, **changes) -> PreprocessConfig:
        """A copy with the given fields changed (None leaves a field as it is)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return {name: (list(v) if isinstance(v, tuple) else v)
                for name, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict, where: str = "the preprocessing config") -> PreprocessConfig:
        if not isinstance(values, dict):
            raise InputError(f"{where} must be a JSON object, got {type(values).__name__}")
        unknown = sorted(set(values) - set(FIELDS))
        if unknown or "input_size" not in values:
            raise InputError(f"{where} has unknown fields {unknown}" if unknown else
                             f"{where} has no input_size")
        return cls(**values)

    def describe(self) -> str:
        """One line for printed reports."""
        c, h, w = self.input_size

        def fmt(values):
            return ", ".join(f"{v:g}" for v in values)
        return (f"{h}x{w} ({c} ch), {self.interpolation}, crop_pct {self.crop_pct:g} ({self.crop_mode}), "
                f"mean ({fmt(self.mean)}), std ({fmt(self.std)})")

    # -- geometry, shared by the PIL and the tensor paths --------------------------------
    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of that size is resized to before the crop (timm's rule)."""
        target_h, target_w = self.size
        scale_h, scale_w = math.floor(target_h / self.crop_pct), math.floor(target_w / self.crop_pct)
        if self.crop_mode == "squash":
            return scale_h, scale_w
        if scale_h == scale_w:  # torchvision's Resize(int): the shorter side to scale, truncated
            if width <= height:
                return int(scale_w * height / width), scale_w
            return scale_h, int(scale_h * width / height)
        ratio = min(height / scale_h, width / scale_w)  # timm's ResizeKeepRatio (shortest side)
        return round(height / ratio), round(width / ratio)

    def crop_offsets(self, height: int, width: int) -> tuple[int, int]:
        """(top, left) of the center crop of a resized (height, width) image (torchvision's)."""
        crop_h, crop_w = self.size
        return int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))


def imagenet_default(img_size: int | Sequence[int], in_chans: int = 3) -> PreprocessConfig:
    """timm's defaults for a model that names none: bicubic, crop_pct 0.875, ImageNet
    statistics (their channel average for one-channel models)."""
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if in_chans == 1:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    return PreprocessConfig((in_chans, *size), mean=mean, std=std)


def default_with_notice(img_size: int | Sequence[int], in_chans: int, what: str) -> PreprocessConfig:
    """imagenet_default for a model that carries no config (an artifact saved before artifacts
    carried their preprocessing), said in one line on stderr when it is about to be used."""
    print(f"note: {what} carries no preprocessing config (saved before artifacts carried it); using "
          "the ImageNet default (bicubic, crop_pct 0.875, ImageNet mean/std)", file=sys.stderr)
    return imagenet_default(img_size, in_chans)


def config_from_timm(model) -> PreprocessConfig:
    """The config timm's own `resolve_data_config(model=model)` gives, at the model's actual
    input size and channels (a model built with img_size/in_chans keyword arguments keeps
    its pretrained_cfg's 224 input_size; the patch embedding knows the real one)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config(model=model)
    channels, height, width = cfg["input_size"]
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None) is not None:
        height, width = patch_embed.img_size
        channels = patch_embed.proj.in_channels
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if len(mean) != channels:  # a 3-channel statistic for a model built with in_chans=1
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    return PreprocessConfig((channels, height, width), interpolation=cfg.get("interpolation", "bicubic"),
                            crop_pct=cfg.get("crop_pct") or DEFAULT_CROP_PCT,
                            crop_mode=cfg.get("crop_mode") or "center", mean=mean, std=std)


# -- the PIL path ------------------------------------------------------------------------
def unreadable(path, err) -> InputError:
    return InputError(f"{path} is not a readable image ({err}); remove or replace it")


def open_image(path: str | Path) -> Image.Image:
    """PIL's lazy open (header only), a broken file or a decompression bomb failing by name."""
    try:
        return Image.open(path)
    except Image.DecompressionBombError as err:  # pixels far beyond any model input
        raise ResourceLimitError(f"{path} is refused as a decompression bomb ({err}); remove or "
                                 "replace it") from None
    except (UnidentifiedImageError, OSError) as err:
        raise unreadable(path, err) from None


def pil_preprocess(image: Image.Image, config: PreprocessConfig) -> Image.Image:
    """Convert (RGB, or L for one channel, as timm's datasets do), resize, center crop."""
    image = image.convert("RGB" if config.channels == 3 else "L")
    height, width = config.resized_size(image.height, image.width)
    if (height, width) != (image.height, image.width):
        image = image.resize((width, height), PIL_INTERPOLATIONS[config.interpolation])
    top, left = config.crop_offsets(height, width)
    crop_h, crop_w = config.size
    return image.crop((left, top, left + crop_w, top + crop_h))


def pil_uint8(path: str | Path, config: PreprocessConfig) -> torch.Tensor:
    """The file decoded by PIL, converted, resized and cropped: a uint8 (C, H, W) tensor."""
    with open_image(path) as image:
        try:
            image = pil_preprocess(image, config)
        except OSError as err:  # truncated files pass the header check and fail on decode
            raise unreadable(path, err) from None
        return pil_pixels(image)


def pil_pixels(image: Image.Image) -> torch.Tensor:
    """A PIL image (RGB or L) as a uint8 (C, H, W) tensor."""
    tensor = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)


def pil_to_tensor(path: str | Path, config: PreprocessConfig) -> torch.Tensor:
    """The model's input (C, H, W) float32 for one image file, computed as timm does."""
    return normalize(pil_uint8(path, config), config)


def normalize(pixels: torch.Tensor, config: PreprocessConfig, dtype: torch.dtype = torch.float32):
    """uint8 (..., C, H, W) -> (x / 255 - mean) / std in float32 (as torchvision's ToTensor +
    Normalize compute it), then cast to dtype; on the pixels' device."""
    mean = torch.tensor(config.mean, dtype=torch.float32, device=pixels.device).view(-1, 1, 1)
    std = torch.tensor(config.std, dtype=torch.float32, device=pixels.device).view(-1, 1, 1)
    return ((pixels.float() / 255 - mean) / std).to(dtype)


# -- the tensor path (CPU or GPU) --------------------------------------------------------
def jpeg_components(data: bytes | memoryview) -> int | None:
    """The number of colour components a JPEG's frame header declares (1 grey, 3 YCbCr/RGB,
    4 CMYK/YCCK), or None when the bytes are not a JPEG or the header is not found."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start-of-frame marker
            return data[pos + 9] if pos + 9 < len(data) else None
        pos += 2 + length
    return None


def tensor_decodable(data: bytes | memoryview) -> bool:
    """Whether torchvision's JPEG decoder gives PIL's RGB for these bytes: one- or three-
    component JPEGs. Other formats and CMYK JPEGs (whose colour conversion differs) go to PIL."""
    return jpeg_components(data) in (1, 3)


def tensor_path_supported(config: PreprocessConfig) -> bool:
    return config.interpolation in TENSOR_INTERPOLATIONS


def _resize_float_two_pass(pixels: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """PIL's uint8 resize in float: horizontal pass, round to uint8, vertical pass, round
    (PIL keeps 8 bits between its passes). For devices without torch's uint8 kernel."""
    x = pixels.unsqueeze(0).float()
    if x.shape[-1] != width:
        x = F.interpolate(x, size=(x.shape[-2], width), mode=mode, antialias=True).round_().clamp_(0, 255)
    if x.shape[-2] != height:
        x = F.interpolate(x, size=(height, width), mode=mode, antialias=True).round_().clamp_(0, 255)
    return x.to(torch.uint8).squeeze(0)


def resize_crop_uint8(pixels: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """uint8 (C, H, W) on any device -> the resized and center-cropped uint8 (C, h, w).
    On the CPU torch's uint8 antialiased kernel (fast, PIL's design); elsewhere the float
    two-pass emulation of PIL's rounding."""
    if not tensor_path_supported(config):
        raise InputError(f"the tensor path resizes with {', '.join(TENSOR_INTERPOLATIONS)}, not "
                         f"{config.interpolation}; use the PIL path")
    height, width = config.resized_size(pixels.shape[-2], pixels.shape[-1])
    if (height, width) != tuple(pixels.shape[-2:]):
        if pixels.device.type == "cpu":
            pixels = F.interpolate(pixels.unsqueeze(0), size=(height, width), mode=config.interpolation,
                                   antialias=True).squeeze(0)
        else:
            pixels = _resize_float_two_pass(pixels, height, width, config.interpolation)
    top, left = config.crop_offsets(height, width)
    crop_h, crop_w = config.size
    return pixels[..., top:top + crop_h, left:left + crop_w]


def read_bytes(path: str | Path) -> torch.Tensor:
    """The file's bytes as a 1-D uint8 tensor (what torchvision's decoders take)."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise unreadable(path, err) from None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _decode_jpegs(datas: list[torch.Tensor], channels: int, device: torch.device) -> list | None:
    """torchvision's decode_jpeg on a list (batched nvJPEG on CUDA); None when it refuses the
    batch (it returns no partial results), so the caller retries image by image."""
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    try:
        with warnings.catch_warnings():  # torchvision 0.29 marks its decoders deprecated (TorchCodec)
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(datas, mode=mode, device=device)
    except RuntimeError:
        return None


def decode_uint8(datas: Sequence[torch.Tensor], paths: Sequence, config: PreprocessConfig,
                 device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Decode and preprocess a batch of encoded images into uint8 (C, h, w) tensors on
    `device`: JPEGs batched through torchvision (nvJPEG on CUDA), everything else -- and any
    JPEG the decoder refuses -- by PIL on the CPU, per image. An image neither can read is a
    ValueError naming its file, never a CUDA error."""
    device = torch.device(device)
    if not tensor_path_supported(config):
        return [pil_uint8(path, config).to(device) for path in paths]
    decoded: list[torch.Tensor | None] = [None] * len(datas)
    jpegs = [i for i, data in enumerate(datas) if tensor_decodable(memoryview(data.numpy()))]
    batch = _decode_jpegs([datas[i] for i in jpegs], config.channels, device) if jpegs else []
    if batch is None:  # one bad file fails the whole batch: find it image by image
        batch = [(_decode_jpegs([datas[i]], config.channels, device) or [None])[0] for i in jpegs]
    for i, pixels in zip(jpegs, batch):
        decoded[i] = pixels
    out = []
    for data_index, pixels in enumerate(decoded):
        if pixels is None:  # not a JPEG the tensor decoder takes: PIL decodes and resizes
            out.append(pil_uint8(paths[data_index], config).to(device, non_blocking=True))
        else:
            out.append(resize_crop_uint8(pixels, config))
    return out
