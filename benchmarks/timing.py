"""Timing helpers shared by the kernel benchmarks.

GPU: triton.testing.do_bench (L2 flushed between runs, median). CPU: wall-clock median
of repeats after a warm-up. Peaks are measured, not taken from a data sheet: the
matmul peak is the best of large square GEMMs in the benchmark's dtype. Whole models
that are compared with each other are timed interleaved (time_interleaved).
"""
import statistics
import time
from typing import Callable

import torch

from dcvit_engine.throughput import Throughput


def median_ms(fn, device: torch.device, warmup: int = 3, repeats: int = 10) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_interleaved(runners: dict[str, Callable[[torch.Tensor], torch.Tensor]], images: torch.Tensor,
                     warmup: int, repeats: int) -> dict[str, Throughput]:
    """Each runner's latency on `images`, timed in rounds: every round calls every runner once
    (the order rotating by one per round), after `warmup` untimed calls of each (compilation,
    CUDA graph capture, oneDNN primitive creation happen there); the median over rounds per
    runner. Clocks as dcvit_engine.throughput.measure_throughput: CUDA events on the current
    stream on a GPU, a monotonic clock on the CPU.

    Why interleaved: on a shared machine the load drifts over seconds to minutes. Timing all of
    runner A's repeats and then all of B's puts A and B under different loads, and the ratio
    B/A then partly measures the drift (the issue-10 CPU runs swung 0.8x-1.8x per cell that
    way). Alternating puts every runner under the same mix of loads, so the ratios the
    benchmarks report (engine / timm, variant / uncompressed) compare like with like; the
    rotation keeps any runner from always following the same one (caches, thread wake-up)."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
    names = list(runners)
    cuda = images.device.type == "cuda"
    times: dict[str, list[float]] = {name: [] for name in names}
    events: dict[str, list] = {name: [] for name in names}
    with torch.no_grad():
        for name in names:
            for _ in range(warmup):
                runners[name](images)
        if cuda:
            torch.cuda.synchronize(images.device)
            stream = torch.cuda.current_stream(images.device)
        for round_index in range(repeats):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                if cuda:
                    # no synchronize between calls (as measure_throughput): the host may run
                    # ahead, so a launch-bound runner is not charged an idle GPU per call
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record(stream)
                    runners[name](images)
                    end.record(stream)
                    events[name].append((start, end))
                else:
                    begin = time.perf_counter()
                    runners[name](images)
                    times[name].append((time.perf_counter() - begin) * 1e3)
        if cuda:
            torch.cuda.synchronize(images.device)
            times = {name: [start.elapsed_time(end) for start, end in pairs]
                     for name, pairs in events.items()}
    return {name: Throughput(batch_size=images.shape[0], repeats=repeats, median_ms=statistics.median(t),
                             min_ms=min(t), max_ms=max(t)) for name, t in times.items()}


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Best measured TFLOP/s of square GEMMs: the ceiling a fused GEMM kernel is held to."""
    sizes = (4096, 8192) if device.type == "cuda" else (512, 1024)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        ms = median_ms(lambda: a @ b, device)
        best = max(best, 2 * n**3 / ms / 1e9)
    return best


def copy_bandwidth_gbs(device: torch.device, numel: int = 1 << 28) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes): the memory ceiling."""
    if device.type != "cuda":
        numel = 1 << 24
    src = torch.empty(numel, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * numel * 4 / ms / 1e6


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def report_table(header, rows, out_dir: str, name: str) -> str:
    """Prints rows (lists of strings) under header as aligned columns and writes them to
    out_dir/name.csv atomically; returns the CSV path."""
    import csv
    import os

    from dcvit_engine.atomic import atomic_open

    table = [list(header)] + [list(r) for r in rows]
    widths = [max(len(str(line[i])) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(str(v).rjust(w) for v, w in zip(line, widths)))
    path = os.path.join(out_dir, f"{name}.csv")
    with atomic_open(path, newline="") as f:
        csv.writer(f).writerows(table)
    print(f"wrote {path}")
    return path


def write_rows_csv(rows: list[dict], fields, path: str) -> None:
    """Dict rows to a CSV (floats to 4 decimals), written atomically."""
    import csv

    from dcvit_engine.atomic import atomic_open

    with atomic_open(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
