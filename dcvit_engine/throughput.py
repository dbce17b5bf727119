"""Model throughput: images/s and latency of a forward pass, median of repeats after warm-up.

Used by `dcvit bench`; benchmarks/bench_models.py times several runners interleaved with
the same clocks (benchmarks/timing.py: time_interleaved). On
CUDA each repeat is timed with CUDA events on the current stream (no host overhead in the
number beyond what the model itself launches); on the CPU with a monotonic clock.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Throughput:
    batch_size: int
    repeats: int
    median_ms: float   # latency of one batch
    min_ms: float
    max_ms: float

    @property
    def images_per_s(self) -> float:
        return self.batch_size / self.median_ms * 1e3

    def to_dict(self) -> dict:
        return dict(asdict(self), images_per_s=self.images_per_s)


def _check_counts(warmup: int, repeats: int) -> None:
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")


def measure_throughput(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                       warmup: int = 3, repeats: int = 10) -> Throughput:
    """Time `model(images)`: `warmup` untimed calls (compilation, CUDA graph capture,
    autotuning happen there), then the median of `repeats` timed calls. Runs under
    torch.no_grad() so eager nn.Modules do not record autograd state."""
    _check_counts(warmup, repeats)
    cuda = images.device.type == "cuda"
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            model(images)
        if cuda:
            torch.cuda.synchronize(images.device)
            stream = torch.cuda.current_stream(images.device)
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(repeats)]
            for start, end in events:
                start.record(stream)
                model(images)
                end.record(stream)
            torch.cuda.synchronize(images.device)
            times = [start.elapsed_time(end) for start, end in events]
        else:
            for _ in range(repeats):
                begin = time.perf_counter()
                model(images)
                times.append((time.perf_counter() - begin) * 1e3)
    return Throughput(batch_size=images.shape[0], repeats=repeats, median_ms=statistics.median(times),
                      min_ms=min(times), max_ms=max(times))
