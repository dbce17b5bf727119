"""The model's preprocessing against timm's own: the config resolved from pretrained_cfg for
DeiT, CLIP, SigLIP and EVA-02 (random weights, nothing downloaded), the PIL path equal to
timm's `create_transform(**resolve_data_config(model=m))` on non-square JPEG/PNG images of
several modes, the tensor path (torchvision decode + torch resize, CPU or GPU code) within a
measured bound of it, and every refused config field."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from dcvit_engine import preprocess
from dcvit_engine.preprocess import PreprocessConfig, config_from_timm, decode_uint8, normalize, pil_to_tensor

IMAGENET_MEAN = preprocess.IMAGENET_MEAN

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The pretrained_cfg values timm 1.0 resolves for each family (noted in the terms:
# DeiT ImageNet statistics, CLIP and EVA-02 OpenAI's CLIP statistics, SigLIP 0.5/0.5).
MODELS = {
    "deit_base_patch16_224": ("bicubic", 0.9, IMAGENET_MEAN, (0.229, 0.224, 0.225)),
    "vit_base_patch16_clip_quickgelu_224": ("bicubic", 1.0, CLIP_MEAN, CLIP_STD),
    "vit_base_patch16_siglip_224": ("bicubic", 0.9, (0.5,) * 3, (0.5,) * 3),
    "eva02_tiny_patch14_224": ("bicubic", 0.9, CLIP_MEAN, CLIP_STD),
}
# (width, height, PIL mode, format): non-square, downscaled and upscaled, every mode timm's
# datasets convert to RGB.
IMAGES = [(500, 375, "RGB", "JPEG"), (333, 500, "RGB", "PNG"), (301, 123, "L", "JPEG"),
          (180, 260, "L", "PNG"), (257, 199, "RGBA", "PNG"), (240, 320, "P", "PNG"),
          (350, 270, "CMYK", "JPEG"), (150, 97, "RGB", "JPEG")]
# Two 8-bit levels after normalisation by the smallest std of these models (0.224), plus float
# slack: what the tensor path's resize may differ from PIL's by (PIL rounds between passes;
# measured: at most 1 level when downscaling, 2 on a few pixels when upscaling 150x97).
TWO_LEVELS = 2 / 255 / 0.224 + 1e-5


def _photo(width, height, seed):
    """Smooth colour gradients with noise: JPEG-realistic content rather than white noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC)).astype(np.int16)
    return Image.fromarray((smooth + rng.integers(-12, 13, smooth.shape)).clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    files = []
    for i, (w, h, mode, fmt) in enumerate(IMAGES):
        image = _photo(w, h, i)
        image = image.quantize(64) if mode == "P" else image.convert(mode)
        path = root / f"{i}_{mode}.{'jpg' if fmt == 'JPEG' else 'png'}"
        image.save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        files.append(path)
    return files


@pytest.fixture(scope="module", params=list(MODELS))
def timm_model(request):
    with torch.device("meta"):  # the config comes from pretrained_cfg; no weights needed
        return request.param, timm.create_model(request.param, pretrained=False, depth=1)


def _timm_input(model, path):
    """What timm feeds the model: its datasets convert to RGB, then the eval transform."""
    transform = create_transform(**resolve_data_config(model=model))
    with Image.open(path) as image:
        return transform(image.convert("RGB"))


def test_config_is_timms_per_family(timm_model):
    name, model = timm_model
    config = config_from_timm(model)
    interpolation, crop_pct, mean, std = MODELS[name]
    assert config.input_size == (3, 224, 224)
    assert (config.interpolation, config.crop_mode) == (interpolation, "center")
    assert config.crop_pct == pytest.approx(crop_pct)
    assert config.mean == pytest.approx(mean) and config.std == pytest.approx(std)


def test_pil_path_equals_timm_transform(timm_model, image_files):
    _, model = timm_model
    config = config_from_timm(model)
    for path in image_files:
        ours, theirs = pil_to_tensor(path, config), _timm_input(model, path)
        assert ours.shape == theirs.shape == (3, 224, 224), path
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0, msg=lambda m: f"{path}: {m}")


def _tensor_path(paths, config, device="cpu"):
    datas = [preprocess.read_bytes(p) for p in paths]
    return normalize(torch.stack(decode_uint8(datas, paths, config, device)), config)


def test_tensor_path_within_two_levels_of_timm(timm_model, image_files):
    """torchvision's decoder gives PIL's pixels; torch's uint8 resize differs from PIL's by at
    most two 8-bit levels, on under 2% of the values (measured: 0-0.55% per image)."""
    _, model = timm_model
    config = config_from_timm(model)
    ours = _tensor_path(image_files, config)
    theirs = torch.stack([_timm_input(model, p) for p in image_files])
    diff = (ours - theirs).abs()
    assert diff.max() <= TWO_LEVELS
    assert (diff > 1e-5).float().mean() < 0.02


def test_float_two_pass_resize_within_two_levels_of_pil(image_files):
    """The resize the GPU runs (float, rounded between passes), run here on the CPU."""
    for interpolation in ("bicubic", "bilinear"):
        config = PreprocessConfig((3, 64, 48), interpolation=interpolation, crop_pct=0.875)
        for path in image_files:
            pil = np.asarray(Image.open(path).convert("RGB")).astype(np.int16)
            h, w = config.resized_size(*pil.shape[:2])
            reference = np.asarray(Image.open(path).convert("RGB").resize(
                (w, h), Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR)).astype(np.int16)
            pixels = torch.from_numpy(pil.astype(np.uint8)).permute(2, 0, 1)
            ours = preprocess._resize_float_two_pass(pixels, h, w, interpolation).permute(1, 2, 0).numpy()
            diff = np.abs(ours.astype(np.int16) - reference)
            assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (path, interpolation)


def test_device_path_batches_mixed_formats_and_falls_back(image_files, tmp_path):
    """The GPU code with device='cpu': JPEGs batched through torchvision, PNG and CMYK JPEG
    through PIL, a corrupt JPEG failing by name (the tensor decoder refuses it, then PIL)."""
    config = PreprocessConfig((3, 32, 40), crop_pct=0.9, mean=(0.5,) * 3, std=(0.5,) * 3)
    cmyk = [p for p in image_files if "CMYK" in p.name][0]
    assert preprocess.jpeg_components(cmyk.read_bytes()) == 4
    assert preprocess.jpeg_components(image_files[1].read_bytes()) is None  # a PNG
    batch = _tensor_path(image_files, config)
    exact = torch.stack([pil_to_tensor(p, config) for p in image_files])
    assert batch.shape == (len(image_files), 3, 32, 40)
    assert (batch - exact).abs().max() <= 2 / 255 / 0.5 + 1e-5
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(preprocess.read_bytes(image_files[0]).numpy().tobytes()[:600])
    with pytest.raises(ValueError, match="corrupt.jpg is not a readable image"):
        _tensor_path([image_files[0], corrupt], config)


def test_resize_crop_refuses_interpolation_it_cannot_match():
    config = PreprocessConfig((3, 8, 8), interpolation="lanczos")
    with pytest.raises(ValueError, match="not lanczos"):
        preprocess.resize_crop_uint8(torch.zeros(3, 10, 12, dtype=torch.uint8), config)


def test_lanczos_config_takes_pil_in_the_batched_path(image_files):
    config = PreprocessConfig((3, 24, 24), interpolation="lanczos", crop_pct=1.0, crop_mode="squash")
    batch = _tensor_path(image_files[:3], config)
    exact = torch.stack([pil_to_tensor(p, config) for p in image_files[:3]])
    torch.testing.assert_close(batch, exact, atol=1e-6, rtol=0)


def test_squash_and_non_square_targets_follow_timm(image_files):
    for kwargs in (dict(input_size=(3, 48, 64), crop_pct=0.9, crop_mode="center"),
                   dict(input_size=(3, 40, 30), crop_pct=0.95, crop_mode="squash"),
                   dict(input_size=(3, 36, 36), crop_pct=1.0, crop_mode="squash")):
        transform = create_transform(interpolation="bilinear", mean=(0.5,) * 3, std=(0.25,) * 3, **kwargs)
        config = PreprocessConfig(kwargs["input_size"], "bilinear", kwargs["crop_pct"], kwargs["crop_mode"],
                                  (0.5,) * 3, (0.25,) * 3)
        for path in image_files:
            with Image.open(path) as image:
                theirs = transform(image.convert("RGB"))
            torch.testing.assert_close(pil_to_tensor(path, config), theirs, atol=1e-5, rtol=0)


def test_grayscale_model_and_config_round_trip(image_files):
    config = preprocess.imagenet_default(20, in_chans=1)
    assert len(config.mean) == 1 and config.crop_pct == 0.875 and config.interpolation == "bicubic"
    assert pil_to_tensor(image_files[0], config).shape == (1, 20, 20)
    assert PreprocessConfig.from_dict(config.to_dict()) == config
    with torch.device("meta"):
        small = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, in_chans=1)
    assert config_from_timm(small).input_size == (1, 32, 32)


@pytest.mark.parametrize("field, value, message", [
    ("crop_pct", 0.0, "crop_pct must be in"), ("crop_pct", -1, "crop_pct must be in"),
    ("crop_pct", 1.5, "crop_pct must be in"), ("interpolation", "cubic", "interpolation 'cubic' is unknown"),
    ("crop_mode", "border", "crop_mode 'border' is not supported"),
    ("std", (0.5, 0, 0.5), "std must be positive"),
    ("mean", (0.5, 0.5), "mean has 2 values"), ("input_size", (3, 0, 8), "input_size must be"),
    ("mean", (float("nan"),) * 3, "mean must be finite"),
])
def test_impossible_values_are_refused_by_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        PreprocessConfig(**{"input_size": (3, 8, 8), field: value})


def test_from_dict_refuses_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown fields \['size'\]"):
        PreprocessConfig.from_dict({"input_size": [3, 8, 8], "size": 8})
