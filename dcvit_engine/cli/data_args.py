"""Image-folder arguments shared by the commands that read images: --data DIR, the sample
count, and the preprocessing overrides (--mean/--std/--crop-pct/--interpolation) on top of
the model's own PreprocessConfig (timm's, or the one its artifact carries)."""
import argparse

from dcvit_engine.cli.option_types import positive_int
from dcvit_engine.data import load_image_folder
from dcvit_engine.preprocess import PIL_INTERPOLATIONS, PreprocessConfig, default_with_notice


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected one number or numbers separated by commas, got {text!r}")
    return values


def _crop_pct(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None


def add_preprocess_arguments(parser: argparse.ArgumentParser) -> None:
    """--mean, --std, --crop-pct, --interpolation: each replaces one field of the model's config."""
    parser.add_argument("--mean", type=_floats, default=None, metavar="M[,M,M]",
                        help="per-channel mean the inputs are normalised with (default: the model's own)")
    parser.add_argument("--std", type=_floats, default=None, metavar="S[,S,S]",
                        help="per-channel std the inputs are normalised with (default: the model's own)")
    parser.add_argument("--crop-pct", type=_crop_pct, default=None, metavar="P",
                        help="resize to input size / P, then center-crop the input size (default: the "
                        "model's own, e.g. 0.875 DeiT, 1.0 CLIP)")
    parser.add_argument("--interpolation", choices=tuple(PIL_INTERPOLATIONS), default=None,
                        help="resize interpolation (default: the model's own, e.g. bicubic)")


def add_data_arguments(parser: argparse.ArgumentParser, *, num_samples_required: bool,
                       data_required: bool = True) -> None:
    parser.add_argument("--data", required=data_required, metavar="DIR",
                        help="image folder: flat (unlabeled) or one subfolder per class (labeled)"
                        + ("" if data_required else "; not needed by a training-free method"))
    parser.add_argument("--num-samples", type=positive_int, required=num_samples_required, default=None,
                        metavar="N", help="use N images of the folder, chosen at random by --seed"
                        + ("" if num_samples_required else " (default: all)"))
    add_preprocess_arguments(parser)


def preprocess_from_args(args, model) -> PreprocessConfig:
    """The model's PreprocessConfig (model.preprocess; timm's ImageNet default for a model
    without one) with the fields the user gave replaced; a bad value names its field."""
    config = getattr(model, "preprocess", None)
    if config is None:
        config = default_with_notice(model.spec.img_size, model.spec.in_chans, "the model")
    return config.replace(mean=args.mean, std=args.std, crop_pct=args.crop_pct,
                          interpolation=args.interpolation)


def images_from_args(args, config: PreprocessConfig, seed: int = 0, data: str | None = None):
    """The images of --data (or `data`) preprocessed with `config` as one (N, C, H, W)
    tensor, the labels (N,) or None when the folder is unlabeled, and the class names (or
    None). --num-samples picks a seeded subset of --data only."""
    folder = load_image_folder(args.data if data is None else data, config,
                               num_samples=args.num_samples if data is None else None, seed=seed)
    images, labels = folder.tensors()
    return images, (labels if folder.labeled else None), folder.classes
