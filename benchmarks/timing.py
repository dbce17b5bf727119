"""Timing helpers shared by the kernel benchmarks.

GPU: triton.testing.do_bench (L2 flushed between runs, median). CPU: wall-clock median
of repeats after a warm-up. Peaks are measured, not taken from a data sheet: the
matmul peak is the best of large GEMMs in the benchmark's dtype (matmul_peak_tflops). Whole models
that are compared with each other are timed interleaved (time_interleaved).
"""
import statistics
import time

import torch

# time_interleaved lives in the package (dcvit bench uses it); re-exported for the benchmarks
from dcvit_engine.throughput import time_interleaved  # noqa: F401


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


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Best measured TFLOP/s of large GEMMs: the ceiling a fused GEMM kernel is held to. On the
    CPU the GEMMs are oneDNN's linear with the weight packed once (what the cpu backend and
    OpenVINO run; ATen's `a @ b` on unpacked square matrices reached about 1.3 of the 2 bf16
    TFLOP/s of a 2-core AMX Xeon), at shapes tall enough for AMX / AVX-512 blocking."""
    if device.type == "cuda":
        best = 0.0
        for n in (4096, 8192):
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            ms = median_ms(lambda: a @ b, device)
            best = max(best, 2 * n**3 / ms / 1e9)
        return best
    packed_linear = torch.backends.mkldnn.is_available() and dtype in (torch.float32, torch.bfloat16)
    best = 0.0
    for rows, n, k in ((2048, 1024, 1024), (4096, 2048, 1024), (4096, 1536, 384)):
        x = torch.randn(rows, k, dtype=dtype)
        w = torch.randn(n, k, dtype=dtype)
        if packed_linear:
            w = torch.ops.mkldnn._reorder_linear_weight(w, rows)
            fn = lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")  # noqa: E731
        else:
            wt = w.t()
            fn = lambda: x @ wt  # noqa: E731
        ms = median_ms(fn, device)
        best = max(best, 2 * rows * n * k / ms / 1e9)
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
