"""Autotuning that batch sizes share and later processes reuse.

`triton.autotune(key=["M", "N", "K"])` benchmarks every config again for each new exact M =
batch x tokens. A ToMe model has a different token count per block, so each new batch size
would re-benchmark ~48 GEMM keys (~0.8 s each) before its CUDA graph is captured, and every
new process starts from nothing. `share_tuning(tuner)` replaces the tuner's result table with
a `TuningTable`:
  - M is bucketed to powers of 8 (`m_bucket`): the first M seen in a bucket is benchmarked
    and the pick serves the bucket. Powers of 8 because the token counts of one ToMe model
    span less than 8x (DeiT-B r=13: 197 -> 41), so one batch size touches at most 2 buckets,
    i.e. at most 8 keys for its 4 GEMM shapes; within a bucket the tile grid stays large
    enough that the pick (a tile shape) still fits.
  - Picks are written to a JSON file under $DCVIT_CACHE/autotune (the project's cache root,
    default ~/.cache/dcvit_engine, as the demo teacher's) whose name hashes the GPU's name,
    the triton version, the kernel's source (its JIT cache key, which covers the functions it
    calls) and the config list, so a stale pick is never read for a changed kernel, another
    GPU or another config set.
Works through Triton's own `Autotuner.run` (it only asks the table `key in`, `[key]`,
`[key] = pick`), so eager launches, `wrap_triton` and CUDA graph warm-ups all share it.
"""
import hashlib
import json
import os
import tempfile

import triton

CACHE_ENV = "DCVIT_CACHE"  # the project's cache root (dcvit_engine/demo_teacher.py uses it too)


def m_bucket(m: int) -> int:
    """The largest power of 8 <= m (1 for m <= 1)."""
    return 1 << (3 * ((max(int(m), 1).bit_length() - 1) // 3))


def cache_dir() -> str:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "dcvit_engine")
    return os.path.join(os.path.expanduser(root), "autotune")


def current_device_name() -> str:
    import torch

    return torch.cuda.get_device_name()


def _config_kwargs(config) -> dict:
    return {k: v for k, v in sorted(config.all_kwargs().items()) if isinstance(v, (int, float, str, bool))}


class TuningTable(dict):
    """An Autotuner's `cache` with M bucketed and the entries persisted per GPU (see module doc).
    Entries are stored under (GPU name, bucketed key)."""

    def __init__(self, tuner, device_name=current_device_name):
        super().__init__()
        if not tuner.keys or tuner.keys[0] != "M":
            raise ValueError(f"TuningTable buckets the first autotune key, which must be M, got {tuner.keys}")
        self._tuner = tuner
        self._device_name = device_name
        self._loaded = set()  # GPU names whose file was read

    # -- what Autotuner.run uses ------------------------------------------------------
    def __contains__(self, key):
        return super().__contains__(self._entry(key))

    def __getitem__(self, key):
        return super().__getitem__(self._entry(key))

    def __setitem__(self, key, config):
        entry = self._entry(key)
        super().__setitem__(entry, config)
        self._save(entry[0])

    # -- keys and files ---------------------------------------------------------------
    def _entry(self, key):
        device = self._device_name()
        if device not in self._loaded:
            self._loaded.add(device)
            self._load(device)
        return (device, (m_bucket(key[0]), *key[1:]))

    def path(self, device: str) -> str:
        base = self._tuner.base_fn
        source = getattr(base, "cache_key", None) or getattr(base, "src", "") or base.__name__
        configs = [_config_kwargs(c) for c in self._tuner.configs]
        digest = hashlib.sha256(json.dumps([device, triton.__version__, source, configs],
                                           sort_keys=True).encode()).hexdigest()[:20]
        return os.path.join(cache_dir(), f"autotune-{base.__name__.strip('_')}-{digest}.json")

    def _read(self, device: str) -> list:
        try:
            with open(self.path(device)) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return []  # no file yet, or one cut short: tune again
        return data.get("entries", []) if isinstance(data, dict) else []

    def _load(self, device: str) -> None:
        configs = self._tuner.configs
        for key, index in self._read(device):
            if isinstance(index, int) and 0 <= index < len(configs):
                super().__setitem__((device, tuple(key)), configs[index])

    def _save(self, device: str) -> None:
        configs = self._tuner.configs
        mine = {tuple(key): configs.index(config) for (dev, key), config in super().items()
                if dev == device and config in configs}
        # another process may have tuned other keys meanwhile: keep those
        merged = {tuple(key): index for key, index in self._read(device)}
        merged.update(mine)
        data = {"gpu": device, "triton": triton.__version__, "kernel": self._tuner.base_fn.__name__,
                "entries": [[list(key), index] for key, index in sorted(merged.items(), key=str)]}
        path = self.path(device)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # written beside and renamed: a reader never sees half a file
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, path)
        except OSError:
            pass  # e.g. a read-only home: the picks still serve this process


def share_tuning(tuner, device_name=current_device_name):
    """Gives a triton Autotuner (keyed on M first) a TuningTable; returns the tuner."""
    tuner.cache = TuningTable(tuner, device_name)
    return tuner
