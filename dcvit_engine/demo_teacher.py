"""A small DeiT-style timm ViT trained on the digits: the demo's "pretrained" teacher.

Nothing can be downloaded, so the demo trains its own teacher once (about 70 s of
one CPU core; 96% top-1 on the 450 held-out digits) and caches it: a timm VisionTransformer with a class
token, built by ``timm.create_model('vit_tiny_patch16_224', pretrained=False,
...)`` so it is the same class people load from the hub.  The cache holds the
weights (safetensors) and a JSON with the model kwargs and the test accuracy,
under DCVIT_CACHE (default ~/.cache/dcvit_engine), keyed by the training
settings so that changed settings never load stale weights.

Layer 3 (a model producer for the demo); imports only the digits from the package.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_folder
from .digits import DIGITS_MEAN, DIGITS_NUM_CLASSES, DIGITS_STD, digits_splits
from .errors import InputError
from .jsonfile import load_json_file
from .progress import progress_bar

TIMM_ARCH = "vit_tiny_patch16_224"
_FORMAT_VERSION = 2  # bump when the training code changes what a config produces
# The teacher is trained on digits_splits(seed=DIGITS_SPLIT_SEED); evaluate it on that split's
# test images, since another seed's test set overlaps this training set.
DIGITS_SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class DemoTeacherConfig:
    """Architecture and training recipe of the demo teacher.

    Patch 8 at 32 px gives a 4x4 token grid (17 tokens with the class token):
    enough for token merging to act on, and four times cheaper than patch 4.
    Small batches matter more than epochs here: a ViT trained from scratch on
    1347 images needs many optimizer steps, and CPU cost is per image.
    """

    img_size: int = 32
    patch_size: int = 8
    embed_dim: int = 72
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    max_shift: int = 2        # random translation in pixels, the only augmentation
    seed: int = 0

    def model_kwargs(self) -> dict:
        return {"img_size": self.img_size, "patch_size": self.patch_size, "embed_dim": self.embed_dim,
                "depth": self.depth, "num_heads": self.num_heads, "mlp_ratio": self.mlp_ratio,
                "num_classes": DIGITS_NUM_CLASSES}

    def cache_key(self) -> str:
        text = json.dumps({"version": _FORMAT_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("DCVIT_CACHE") or Path.home() / ".cache" / "dcvit_engine").expanduser()


def build_demo_model(model_kwargs: dict) -> torch.nn.Module:
    """An untrained timm ViT with the given kwargs, its pretrained_cfg describing the digits input."""
    model = timm.create_model(TIMM_ARCH, pretrained=False, **model_kwargs)
    size = model_kwargs["img_size"]
    # Downstream code reads normalization and input size from pretrained_cfg, as for hub models.
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": DIGITS_MEAN, "std": DIGITS_STD,
                            "input_size": (3, size, size), "num_classes": model_kwargs["num_classes"],
                            "crop_pct": 1.0, "tag": "dcvit_demo_digits"}
    model.default_cfg = model.pretrained_cfg
    return model


def _random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate every image by its own random offset, filling with the background value."""
    if max_shift == 0:
        return images
    background = float(images.amin())
    padded = F.pad(images, (max_shift,) * 4, value=background)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator).tolist()
    h, w = images.shape[-2:]
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


@torch.no_grad()
def evaluate_top1(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  batch_size: int = 256) -> float:
    """Top-1 accuracy in percent."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start:start + batch_size])
        correct += int((logits.argmax(-1) == labels[start:start + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / len(images)


def train_demo_teacher(config: DemoTeacherConfig, progress: bool = True
                       ) -> tuple[torch.nn.Module, dict]:
    """Train a fresh teacher on the digits train split; returns (model in eval mode, info).

    Runs on one CPU thread: the matrices are so small (17 tokens x 72 channels) that a
    second thread gains little, and on a busy machine OpenMP's spinning threads made
    training several times slower.  One thread also makes the weights the same on
    every machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(config, progress)
    finally:
        torch.set_num_threads(threads)


def _train(config: DemoTeacherConfig, progress: bool) -> tuple[torch.nn.Module, dict]:
    train_x, train_y, test_x, test_y = digits_splits(config.img_size, seed=DIGITS_SPLIT_SEED)
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(config.seed)
        model = build_demo_model(config.model_kwargs())
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = len(train_x) // config.batch_size  # drop the ragged last batch
    if steps_per_epoch == 0:
        raise InputError(f"batch_size {config.batch_size} exceeds the {len(train_x)} training images")
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = max(1, int(config.warmup_epochs * steps_per_epoch))

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    start = time.perf_counter()
    model.train()
    bar = progress_bar(range(config.epochs), desc="training demo teacher", disable=not progress)
    for _ in bar:
        order = torch.randperm(len(train_x), generator=generator)
        for step in range(steps_per_epoch):
            batch = order[step * config.batch_size:(step + 1) * config.batch_size]
            images = _random_shift(train_x[batch], config.max_shift, generator)
            loss = F.cross_entropy(model(images), train_y[batch], label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    train_seconds = time.perf_counter() - start
    model.eval()
    info = {"arch": TIMM_ARCH, "model_kwargs": config.model_kwargs(), "config": dataclasses.asdict(config),
            "test_top1": evaluate_top1(model, test_x, test_y), "train_seconds": round(train_seconds, 2),
            "mean": list(DIGITS_MEAN), "std": list(DIGITS_STD), "split_seed": DIGITS_SPLIT_SEED,
            "num_train": len(train_x),
            "num_test": len(test_x)}
    return model, info


def _save(folder: Path, model: torch.nn.Module, info: dict) -> None:
    """Write weights + info into a staging sibling, then rename it over folder."""
    with atomic_folder(folder) as staging:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(staging / "model.safetensors"))
        (staging / "info.json").write_text(json.dumps(info, indent=2))


def _load(folder: Path, config: DemoTeacherConfig) -> tuple[torch.nn.Module, dict]:
    info = load_json_file(folder / "info.json", hint="remove the demo cache folder to rebuild it")
    if info.get("config") != dataclasses.asdict(config):
        raise InputError(f"{folder / 'info.json'} was written for other settings")
    model = build_demo_model(info["model_kwargs"])
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval(), info


def demo_teacher(cache_dir: str | os.PathLike | None = None, force: bool = False,
                 config: DemoTeacherConfig | None = None, progress: bool = True
                 ) -> tuple[torch.nn.Module, dict]:
    """The trained demo teacher (timm ViT, eval mode) and its info dict.

    Loads from the cache when a teacher with these settings is there; otherwise
    (or with force=True) trains one and caches it.  info holds model_kwargs,
    test_top1 (percent, on the 450 held-out digits), train_seconds, mean/std,
    plus path (the cache folder) and from_cache.
    """
    config = config or DemoTeacherConfig()
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = folder / f"demo_teacher-{config.cache_key()}"
    if not force and (folder / "info.json").is_file():
        try:
            model, info = _load(folder, config)
            return model, {**info, "path": str(folder), "from_cache": True}
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
            warnings.warn(f"cached demo teacher in {folder} is unusable ({err}); training a new one")
    model, info = train_demo_teacher(config, progress=progress)
    _save(folder, model, info)
    return model, {**info, "path": str(folder), "from_cache": False}
