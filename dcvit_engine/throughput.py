"""Model throughput: images/s and latency of a forward pass, median of repeats after warm-up.

Used by `dcvit bench` and the benchmarks. `measure_throughput` times one model;
`time_interleaved` times several in alternating rounds so that their ratios compare runs
made under the same load. On
CUDA each repeat is timed with CUDA events on the current stream (no host overhead in the
number beyond what the model itself launches); on the CPU with a monotonic clock.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from dcvit_engine.errors import InputError, is_int


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
    if not is_int(warmup) or warmup < 0:
        raise InputError(f"warmup must be an integer >= 0, got {warmup!r}")
    if not is_int(repeats) or repeats < 1:
        raise InputError(f"repeats must be an integer >= 1, got {repeats!r}")


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
        raise InputError(f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
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
