"""Input-pipeline benchmark: can `dcvit infer` feed the engine?

Writes its own synthetic ImageNet-sized JPEGs (500x375 .. 640x480, both orientations,
quality 90: smooth colour fields with noise, so they compress like photos) and measures
- decode + preprocess per CPU core (one thread): PIL (timm's way) against the project's CPU
  path (torchvision's decoder + torch's uint8 resize), each image from its file to the
  model's cropped uint8 input;
- on --device cuda, the batched GPU path (nvJPEG + resize/crop/normalise on the device);
- `dcvit infer` (run_inference, no CSV) images/s against the engine alone (random input
  already on the device) on the same model, batch and dtype, with --decode cpu and, on a
  GPU, also --decode device (its default there); the goal on a GPU is infer >= 90% of the
  engine (DeiT-B bf16 batch 256).
Every path's output is also compared with PIL's: max_diff_levels is the largest difference
in 8-bit levels, differing_fraction the share of values that differ at all.

  python benchmarks/bench_input_pipeline.py --device cuda --out bench_out
  python benchmarks/bench_input_pipeline.py --device cpu --out bench_out --model deit_tiny_patch16_224 \\
      --batch-size 32 --dtype float32 --images 256
Writes DIR/input_pipeline.csv (and the JPEGs under DIR/input_pipeline_images/).
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dcvit_engine.engine import build_engine, parse_dtype
from dcvit_engine.infer import run_inference
from dcvit_engine.models import parse_model_kwargs, resolve_model
from dcvit_engine.preprocess import decode_uint8, normalize, pil_uint8, read_bytes
from dcvit_engine.throughput import measure_throughput

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import write_rows_csv  # noqa: E402

SIZES = [(500, 375), (375, 500), (640, 480), (480, 640), (500, 333), (333, 500), (640, 427), (500, 400)]
FIELDS = ["stage", "runner", "device", "threads", "model", "batch_size", "dtype", "images", "images_per_s",
          "max_diff_levels", "differing_fraction"]


def _write_jpeg(path: Path, index: int) -> None:
    rng = np.random.default_rng(index)
    width, height = SIZES[index % len(SIZES)]
    coarse = Image.fromarray(rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC)).astype(np.int16)
    noisy = (smooth + rng.integers(-10, 11, smooth.shape)).clip(0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(path, format="JPEG", quality=90)


def write_jpegs(folder: Path, count: int) -> list[Path]:
    """`count` synthetic photos as JPEGs (quality 90), the sizes in SIZES by turn, written by
    every core; reused when an earlier run wrote the same ones."""
    from concurrent.futures import ProcessPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img_{i:05d}.jpg" for i in range(count)]
    missing = [i for i, path in enumerate(paths) if not path.is_file()]
    if len(missing) < 64:
        for i in missing:
            _write_jpeg(paths[i], i)
    else:
        with ProcessPoolExecutor() as pool:
            list(pool.map(_write_jpeg, [paths[i] for i in missing], missing, chunksize=32))
    return paths


def _rate(fn, items: int, repeats: int = 3) -> float:
    """Best images/s of `repeats` runs of fn (which processes `items` images)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return items / best


def _compare(outputs: list[torch.Tensor], references: list[torch.Tensor]) -> tuple[int, float]:
    diffs = [(o.cpu().int() - r.int()).abs() for o, r in zip(outputs, references)]
    differing = sum(int((d > 0).sum()) for d in diffs) / sum(d.numel() for d in diffs)
    return max(int(d.max()) for d in diffs), differing


def bench_cpu_core(paths, config, row) -> tuple[list[dict], list[torch.Tensor]]:
    """Per CPU core: one thread, one image at a time, file to cropped uint8."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = [pil_uint8(p, config) for p in paths]
        rows = [dict(row, stage="decode+preprocess per core", runner="PIL (timm)", threads=1,
                     images_per_s=_rate(lambda: [pil_uint8(p, config) for p in paths], len(paths)),
                     max_diff_levels=0, differing_fraction=0.0)]

        def project():
            return [decode_uint8([read_bytes(p)], [p], config)[0] for p in paths]
        diff = _compare(project(), reference)
        rows.append(dict(row, stage="decode+preprocess per core", runner="torchvision+torch (dcvit cpu path)",
                         threads=1, images_per_s=_rate(project, len(paths)), max_diff_levels=diff[0],
                         differing_fraction=diff[1]))
    finally:
        torch.set_num_threads(threads)
    return rows, reference


def bench_gpu_decode(paths, config, device, batch_size, dtype, reference, row) -> dict:
    """Batched on the device: nvJPEG + resize/crop/normalise, file bytes already in memory."""
    datas = [read_bytes(p) for p in paths]
    batches = [(datas[i:i + batch_size], paths[i:i + batch_size]) for i in range(0, len(paths), batch_size)]

    def run():
        out = [normalize(torch.stack(decode_uint8(d, p, config, device)), config, dtype) for d, p in batches]
        torch.cuda.synchronize(device)
        return out
    run()  # nvJPEG handles and kernels warm up
    pixels = [t for d, p in batches for t in decode_uint8(d, p, config, device)]
    diff = _compare(pixels, reference)
    return dict(row, stage="decode+preprocess batched", runner="nvJPEG + torch on the GPU",
                threads=torch.get_num_threads(), images_per_s=_rate(run, len(paths)),
                max_diff_levels=diff[0], differing_fraction=diff[1])


def bench_infer(model, folder, device, batch_size, dtype, backend, workers, row) -> list[dict]:
    engine = build_engine(model, backend=backend, dtype=dtype, device=device)
    spec = engine.spec
    images = torch.randn(batch_size, spec.in_chans, *spec.img_size, device=device).to(dtype)
    alone = measure_throughput(engine, images, warmup=3, repeats=10)
    rows = [dict(row, stage="model", runner="engine alone", threads=torch.get_num_threads(),
                 images_per_s=alone.images_per_s)]
    # on a GPU both decode paths: batched nvJPEG (infer's default there) and the CPU workers
    for decode in ("device", "cpu") if device.type == "cuda" else ("cpu",):
        kwargs = dict(batch_size=batch_size, num_workers=workers, progress=False, preprocess=model.preprocess,
                      decode=decode)
        run_inference(engine, folder, None, **kwargs)  # warm-up: workers, CUDA graphs, decoder handles
        result = run_inference(engine, folder, None, **kwargs)
        rows.append(dict(row, stage="model", runner=f"dcvit infer --decode {decode} ({workers} workers)",
                         threads=torch.get_num_threads(), images_per_s=result.images_per_s))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--model", default="deit_base_patch16_224")
    parser.add_argument("--model-kwargs", default=None, metavar="JSON")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dtype", default="bf16", help="bf16 | fp16 | float32 (default bf16)")
    parser.add_argument("--images", type=int, default=2048, help="synthetic JPEGs (default 2048)")
    parser.add_argument("--core-images", type=int, default=128,
                        help="of those, how many the per-core decode rows time (default 128)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="dcvit infer's DataLoader workers (default min(8, cores))")
    parser.add_argument("--backend", default=None)
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.images < 1 or args.core_images < 1:
        parser.error("--batch-size, --images and --core-images must be positive")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a GPU; use --device cpu")
    dtype = parse_dtype(args.dtype)
    out = Path(args.out)
    folder = out / "input_pipeline_images"
    paths = write_jpegs(folder, args.images)
    model = resolve_model(model_name=args.model, model_kwargs=parse_model_kwargs(args.model_kwargs) or None)
    config = model.preprocess
    row = dict(device=str(device), model=args.model, batch_size=args.batch_size, dtype=args.dtype,
               images=len(paths), max_diff_levels="", differing_fraction="")
    print(f"{len(paths)} JPEGs in {folder}; preprocessing {config.describe()}")
    core_paths = paths[:args.core_images]
    rows, reference = bench_cpu_core(core_paths, config, dict(row, images=len(core_paths)))
    if device.type == "cuda":
        rows.append(bench_gpu_decode(core_paths, config, device, args.batch_size, dtype, reference,
                                     dict(row, images=len(core_paths))))
    rows += bench_infer(model, folder, device, args.batch_size, dtype, args.backend, args.workers, row)
    for r in rows:
        diff = f", max diff {r['max_diff_levels']} levels on {r['differing_fraction']:.4%} of values" \
            if r["max_diff_levels"] != "" else ""
        print(f"{r['stage']:28s} {r['runner']:38s} {r['images_per_s']:10.1f} images/s{diff}")
    engine_rate = next(r["images_per_s"] for r in rows if r["runner"] == "engine alone")
    for r in rows:
        if r["runner"].startswith("dcvit infer"):
            print(f"{r['runner']} at {r['images_per_s'] / engine_rate:.1%} of the engine alone")
    out.mkdir(parents=True, exist_ok=True)
    write_rows_csv(rows, FIELDS, str(out / "input_pipeline.csv"))
    print(f"wrote {out / 'input_pipeline.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
