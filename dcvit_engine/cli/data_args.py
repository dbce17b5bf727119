"""Image-folder arguments shared by the commands that read images: --data DIR, the sample
count, and the normalisation the model expects."""
import argparse

from dcvit_engine.cli.option_types import positive_int
from dcvit_engine.data import IMAGENET_MEAN, IMAGENET_STD, load_image_folder


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected one number or numbers separated by commas, got {text!r}")
    return values


def add_data_arguments(parser: argparse.ArgumentParser, *, num_samples_required: bool) -> None:
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="image folder: flat (unlabeled) or one subfolder per class (labeled)")
    parser.add_argument("--num-samples", type=positive_int, required=num_samples_required, default=None,
                        metavar="N", help="use N images of the folder, chosen at random by --seed"
                        + ("" if num_samples_required else " (default: all)"))
    parser.add_argument("--mean", type=_floats, default=IMAGENET_MEAN, metavar="M[,M,M]",
                        help="per-channel mean the model's inputs are normalised with (default: ImageNet)")
    parser.add_argument("--std", type=_floats, default=IMAGENET_STD, metavar="S[,S,S]",
                        help="per-channel std the model's inputs are normalised with (default: ImageNet)")


def _stats(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    return values * channels if len(values) == 1 else values


def images_from_args(args, spec, seed: int = 0):
    """The folder's images as an (N, C, H, W) tensor at the model's input size, the labels
    (N,) or None when the folder is unlabeled, and the class names (or None)."""
    data = load_image_folder(args.data, spec.img_size, mean=_stats(args.mean, spec.in_chans),
                             std=_stats(args.std, spec.in_chans), num_samples=args.num_samples,
                             seed=seed, in_chans=spec.in_chans)
    images, labels = data.tensors()
    return images, (labels if data.labeled else None), data.classes
