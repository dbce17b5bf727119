"""The few-shot augmentations of the methods that finetune on their images (DC-ViT,
PRACTISE): the names the `augment` option takes and the DC-ViT scripts' official transform."""
from __future__ import annotations

import torch

from ..data import IMAGENET_MEAN, IMAGENET_STD
from ..errors import InputError

# Few-shot augmentations: name -> (augment, flip) for finetune.feature_mimic_finetune.
# Horizontal flips suit natural images but not digits or text. "official" is the DC-ViT
# scripts' training transform (official_augment), for ImageNet-normalised natural images.
AUGMENTATIONS = {"flip+shift": (True, True), "shift": (True, False), "none": (False, False),
                 "official": ("official", True)}


def augment_flags(augment: str) -> dict:
    """feature_mimic_finetune's augment/flip keywords for an AUGMENTATIONS name."""
    if augment not in AUGMENTATIONS:
        raise InputError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
    on, flip = AUGMENTATIONS[augment]
    return dict(augment=on, flip=flip)


def official_augment(images: torch.Tensor, generator: torch.Generator, mean=IMAGENET_MEAN,
                     std=IMAGENET_STD) -> torch.Tensor:
    """The DC-ViT scripts' few-shot training transform on a batch of normalised images: timm's
    create_transform(is_training=True, auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.3),
    i.e. RandomResizedCrop (scale 0.08-1, bicubic) back to the input size, a horizontal flip
    with probability 0.5 and RandAugment (2 ops, magnitude 9 of 10; torchvision's op set and
    ranges, which differ a little from timm's: no SolarizeAdd, no magnitude noise). timm drops
    the colour jitter whenever RandAugment is on, so the scripts' 0.3 never applies and none
    is applied here.
    Each image gets its own draw; the draws come from `generator` (torchvision.transforms.v2
    uses the global RNG, so it runs under a forked RNG seeded from the generator)."""
    from torchvision.transforms import InterpolationMode, v2

    n, channels, h, w = images.shape
    m = torch.as_tensor(mean, dtype=images.dtype).flatten().expand(channels).reshape(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype).flatten().expand(channels).reshape(1, -1, 1, 1)
    pixels = (images.detach().cpu() * s + m).clamp(0, 1)
    transform = v2.Compose([
        v2.RandomResizedCrop((h, w), scale=(0.08, 1.0), interpolation=InterpolationMode.BICUBIC,
                             antialias=True),
        v2.RandomHorizontalFlip(),
        # timm's m9 is 9 of its 10 levels, 0.9 of each op's range: 27 of torchvision's 30 steps
        v2.RandAugment(num_ops=2, magnitude=27, num_magnitude_bins=31),
    ])
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = torch.stack([transform(image).clamp(0, 1) for image in pixels])
    return ((out - m) / s).to(images.device)
