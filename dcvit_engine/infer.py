"""Batched inference over an image folder, optionally data-parallel, into a predictions CSV.

Images are preprocessed with the model's PreprocessConfig (preprocess.py: timm's evaluation
transform, carried by the artifact) in one of two ways:
- decode "device" (the default on CUDA): DataLoader workers only read the files' bytes; the
  batch is decoded on the engine's device (batched nvJPEG via torchvision), resized, cropped
  and normalised there, on a side stream while the previous batch computes. PNGs and JPEGs
  nvJPEG refuses (CMYK, corrupt) are decoded by PIL on the CPU, per image.
- decode "cpu" (the default elsewhere): each DataLoader worker decodes with torchvision and
  resizes with torch's uint8 kernel (the fastest CPU path measured, within two 8-bit levels
  of PIL); the uint8 batch is normalised on the device.
Launched by torchrun (WORLD_SIZE > 1), every rank takes every world_size-th image -- no
padding duplicates, unlike DistributedSampler, so each image is predicted exactly once --
decodes its shard on its own GPU, and rank 0 gathers the predictions and writes the CSV.
"""
from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from .atomic import atomic_open
from .data import load_image_folder, nonfinite_mask, refuse_nonfinite
from .engine import Engine, build_engine
from .errors import InputError, is_int, worker_errors_unwrapped
from .preprocess import (
    PreprocessConfig,
    config_from_timm,
    decode_uint8,
    default_with_notice,
    normalize,
    read_bytes,
)
from .progress import progress_bar

DECODE_CHOICES = ("auto", "cpu", "device")


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world_size, ...: the shards of all ranks partition the dataset."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


class _Encoded(Dataset):
    """Items (file bytes, label, index) for decoding on the device; the index survives
    batching and gathering."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return read_bytes(self.dataset.paths[index]), self.dataset.labels[index], index


class _Decoded(_Encoded):
    """Items (uint8 preprocessed image, label, index), decoded in the DataLoader worker."""

    def __getitem__(self, index):
        data, label, index = super().__getitem__(index)
        path = self.dataset.paths[index]
        return decode_uint8([data], [path], self.dataset.config)[0], label, index


def _collate_encoded(items):
    datas, labels, indices = zip(*items)
    return list(datas), torch.tensor(labels), torch.tensor(indices)


@dataclass
class InferenceResult:
    """What one run produced. `rows` (every image, in folder order) and `accuracy` are
    filled on rank 0 only; other ranks see their own image count."""
    out_path: Path | None
    num_images: int
    seconds: float
    world_size: int
    rows: list[dict] = field(default_factory=list)
    accuracy: float | None = None  # top-1 agreement with the folder's class indices, when labeled
    columns: dict[str, str] = field(default_factory=dict)  # each CSV column -> what it holds

    @property
    def images_per_s(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else float("inf")


def _distributed() -> tuple[int, int, bool]:
    """(rank, world_size, whether this call initialized the process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), True


def _default_device(world_size: int) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if world_size > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cuda", torch.cuda.current_device())


def _device_batches(loader: DataLoader, prepare, device: torch.device):
    """(images on the device, labels, indices) per batch, `prepare` turning a loader batch's
    first item into the device images. On CUDA the next batch is prepared on a side stream
    after the current one is handed out, so its copy/decode overlaps the current compute."""
    if device.type != "cuda":
        for first, labels, indices in loader:
            yield prepare(first, indices), labels, indices
        return
    side = torch.cuda.Stream(device=device)
    compute = torch.cuda.current_stream(device)

    def on_side_stream(batch):
        first, labels, indices = batch
        # no wait on the compute stream: that would serialise the decode behind the batch just
        # handed out; record_stream in _handed_over keeps the allocator from reusing its memory
        with torch.cuda.stream(side):
            images = prepare(first, indices)
        return images, labels, indices

    upcoming = None
    for batch in loader:
        if upcoming is not None:
            yield _handed_over(upcoming, side, compute)
        upcoming = on_side_stream(batch)  # runs while the batch just handed out computes
    if upcoming is not None:
        yield _handed_over(upcoming, side, compute)


def _handed_over(prepared, side, compute):
    compute.wait_stream(side)
    prepared[0].record_stream(compute)  # its memory came from the side stream
    return prepared


def _predict_shard(engine: Engine, loader: DataLoader, prepare, batch_size: int, progress: bool):
    """Indices, top-1 classes and probabilities of this rank's images (CPU tensors), and how
    many of its images hold NaN/Inf and how many get NaN/Inf outputs (a (2,) tensor)."""
    device = engine.device
    pad = device.type == "cuda"  # one batch size -> one CUDA graph; pad the last batch
    indices, classes, probs = [], [], []
    nonfinite = torch.zeros(2, dtype=torch.long, device=device)
    with torch.no_grad(), progress_bar(total=len(loader.sampler), unit="img", disable=not progress,
                                       desc="infer") as bar:
        for images, _, batch_indices in _device_batches(loader, prepare, device):
            count = images.shape[0]
            if pad and count < batch_size:
                images = torch.cat([images, images.new_zeros(batch_size - count, *images.shape[1:])])
            logits = engine(images)[:count]
            nonfinite += torch.stack([nonfinite_mask(images[:count]).sum(), nonfinite_mask(logits).sum()])
            top_prob, top_class = logits.float().softmax(dim=-1).max(dim=-1)
            indices.append(batch_indices)
            classes.append(top_class)
            probs.append(top_prob)
            bar.update(count)
    if not indices:
        return (torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), torch.empty(0),
                nonfinite.cpu())
    # one device-to-host transfer at the end: no per-batch synchronisation
    return torch.cat(indices), torch.cat(classes).cpu(), torch.cat(probs).cpu(), nonfinite.cpu()


def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with atomic_open(path, newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def model_preprocess(model, spec) -> PreprocessConfig:
    """The PreprocessConfig a model carries: an artifact folder's preprocess.json, a loaded
    model's .preprocess, a timm model's resolve_data_config; else timm's ImageNet default."""
    if isinstance(model, (str, os.PathLike)):
        from .artifact import load_preprocess

        return load_preprocess(model, spec)
    config = getattr(model, "preprocess", None)
    if config is None and hasattr(model, "pretrained_cfg"):
        config = config_from_timm(model)
    return config if config is not None else default_with_notice(spec.img_size, spec.in_chans, "the model")


def _loader_and_prepare(dataset, decode: str, device: torch.device, dtype: torch.dtype, batch_size: int,
                        sampler: Sampler, num_workers: int):
    """The DataLoader of one decode mode and prepare(first item of a batch, indices): the
    batch as the engine's input (normalised, in dtype, on the device)."""
    config = dataset.config
    if decode == "device":
        def prepare(datas, indices):
            paths = [dataset.paths[i] for i in indices.tolist()]
            return normalize(torch.stack(decode_uint8(datas, paths, config, device)), config, dtype)

        loader = DataLoader(_Encoded(dataset), batch_size=batch_size, sampler=sampler,
                            num_workers=num_workers, collate_fn=_collate_encoded)
        return loader, prepare

    def prepare(pixels, indices):  # uint8 crosses to the device: a quarter of float32's bytes
        return normalize(pixels.to(device, non_blocking=True), config, dtype)

    loader = DataLoader(_Decoded(dataset), batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    return loader, prepare


def run_inference(model, data_dir: str | os.PathLike, out_csv: str | os.PathLike | None, *,
                  batch_size: int = 64, backend: str | None = None, dtype=None, device=None,
                  num_workers: int = 2, preprocess: PreprocessConfig | None = None,
                  mean: float | Sequence[float] | None = None, std: float | Sequence[float] | None = None,
                  decode: str = "auto", labeled: bool | str = "auto",
                  class_names: Sequence[str] | None = None, progress: bool = True,
                  cuda_graphs: bool = True) -> InferenceResult:
    """Predict every image of `data_dir` and write `out_csv` (columns path, predicted,
    [predicted_name,] probability[, label, label_index]: InferenceResult.columns says what
    each holds; predicted_name from `class_names`, else from a labeled folder's subfolders
    when they are as many as the model's classes); out_csv None writes nothing.

    model: an Engine, or anything build_engine takes (timm ViT, ViTReference, artifact
    folder), built here with backend/dtype/device. Images are preprocessed with
    `preprocess` (default: the model's own, see model_preprocess), its mean/std replaced by
    `mean`/`std` when given. decode: "device" decodes batches on the engine's device (nvJPEG
    on CUDA), "cpu" in the DataLoader workers; "auto" picks device on CUDA. Under torchrun
    each rank predicts its shard on its GPU (LOCAL_RANK) and rank 0 writes the CSV.
    """
    if not is_int(batch_size) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if decode not in DECODE_CHOICES:
        raise InputError(f"decode must be one of {', '.join(DECODE_CHOICES)}, got {decode!r}")
    rank, world_size, owns_group = _distributed()
    try:
        if isinstance(model, Engine):
            engine = model
        else:
            target = torch.device(device) if device is not None else _default_device(world_size)
            if dtype is None:
                dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
            engine = build_engine(model, backend=backend, dtype=dtype, device=target,
                                  cuda_graphs=cuda_graphs)
        spec = engine.spec
        if spec.num_classes == 0:
            raise InputError("the model has no classification head (num_classes = 0); inference "
                             "predicts classes, so it needs one")
        if class_names is not None and len(class_names) != spec.num_classes:
            raise InputError(f"{len(class_names)} class names given but the model has "
                             f"{spec.num_classes} classes")
        config = (preprocess or model_preprocess(model, spec)).replace(mean=mean, std=std)
        if config.input_size != (spec.in_chans, *spec.img_size):
            raise InputError(f"the preprocessing config's input_size {config.input_size} is not the "
                             f"model's input {(spec.in_chans, *spec.img_size)}")
        dataset = load_image_folder(data_dir, config, labeled=labeled)
        if decode == "auto":
            decode = "device" if engine.device.type == "cuda" else "cpu"
        loader, prepare = _loader_and_prepare(dataset, decode, engine.device, engine.dtype, batch_size,
                                              ShardSampler(len(dataset), rank, world_size), num_workers)
        start = time.perf_counter()
        with worker_errors_unwrapped():  # a bad image read by a worker: its own one line
            shard = _predict_shard(engine, loader, prepare, batch_size, progress and rank == 0)
        if world_size > 1:
            gathered = [None] * world_size if rank == 0 else None
            dist.gather_object(shard, gathered, dst=0)
        else:
            gathered = [shard]
        seconds = time.perf_counter() - start
        if rank != 0:
            return InferenceResult(None, len(shard[0]), seconds, world_size)
        return _finish(dataset, gathered, out_csv, class_names, seconds, world_size, spec.num_classes)
    finally:
        if owns_group:
            dist.destroy_process_group()


def _finish(dataset, gathered, out_csv, class_names, seconds, world_size,
            num_classes: int) -> InferenceResult:
    bad_images, bad_outputs = sum(g[3] for g in gathered).tolist()
    refuse_nonfinite(len(dataset), bad_images, bad_outputs)  # before anything is written
    indices = torch.cat([g[0] for g in gathered])
    classes = torch.cat([g[1] for g in gathered])
    probs = torch.cat([g[2] for g in gathered])
    if sorted(indices.tolist()) != list(range(len(dataset))):
        raise RuntimeError("the gathered predictions do not cover every image exactly once")
    order = indices.argsort()
    columns = _columns(dataset, class_names, num_classes)
    if "predicted_name" in columns and class_names is None:  # the folder's names: see _columns
        class_names = dataset.classes
    fields = list(columns)
    rows, correct = [], 0
    for i in order.tolist():
        index, predicted = int(indices[i]), int(classes[i])
        row = {"path": dataset.paths[index].relative_to(dataset.root).as_posix(), "predicted": predicted,
               "probability": f"{float(probs[i]):.6f}"}
        if class_names is not None:
            row["predicted_name"] = class_names[predicted]
        if dataset.labeled:
            label = dataset.labels[index]
            row.update(label=dataset.classes[label], label_index=label)
            correct += predicted == label
        rows.append(row)
    out_path = None
    if out_csv is not None:
        out_path = Path(out_csv)
        _write_csv(out_path, rows, fields)
    accuracy = correct / len(rows) if dataset.labeled and rows else None
    return InferenceResult(out_path, len(rows), seconds, world_size, rows, accuracy, columns)


def _columns(dataset, class_names, num_classes: int) -> dict[str, str]:
    """The CSV's columns and what each holds. Class names come from `class_names`, else from
    the folder's class subfolders when the model has as many classes as the folder (the
    label_index column already takes the sorted subfolders as the model's class order)."""
    named_by = ("the given class names" if class_names is not None else
                "the folder's class subfolders (sorted, as label_index)"
                if dataset.labeled and len(dataset.classes) == num_classes else None)
    columns = {"path": "image path under the folder", "predicted": "top-1 class index of the model"}
    if named_by:
        columns["predicted_name"] = f"the predicted class's name, from {named_by}"
    columns["probability"] = "softmax probability of the top-1 class"
    if dataset.labeled:
        columns.update(label="the image's class subfolder",
                       label_index="that subfolder's index among the sorted subfolders")
    return columns
