"""The engine's CPU peers: onnxruntime and OpenVINO, fed by the project's own ONNX export.

Nobody deploys a ViT on a CPU with timm eager: they export it and run onnxruntime or
OpenVINO. `dcvit bench --peers` and benchmarks/bench_peers.py time those beside the engine
on the same weights. Both peers read one fp32 ONNX file with a dynamic batch
(export_for_peers, verified by dcvit_engine.export like every export); bf16 is OpenVINO's
`INFERENCE_PRECISION_HINT` on that file (the weights stay fp32 in the file, OpenVINO converts
them at compile time, as its users run bf16). onnxruntime's CPU provider has no bf16 kernels,
so it runs fp32 only.

A peer that is not installed, or that cannot load the file, is an `Unavailable` with the
reason, never an exception: the caller reports it and measures the rest. The peers come from
the `peers` extra (`pip install -e ".[peers]"`).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .export import INPUT_NAME, ExportError, export_model

PEERS = ("onnxruntime", "openvino")
PEERS_EXTRA = 'pip install -e ".[peers]"'
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
OPENVINO_PRECISION = {torch.float32: "f32", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Unavailable:
    """A peer that cannot be timed, and why (one line)."""
    peer: str
    reason: str


def _first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def _import(peer: str):
    """The peer's module, or an Unavailable naming the install command."""
    try:
        return importlib.import_module(peer)
    except ImportError:
        return Unavailable(peer, f"{peer} is not installed ({PEERS_EXTRA})")


def runtime_versions() -> dict[str, str]:
    """torch's and each peer's version ("not installed" for a missing peer)."""
    versions = {"torch": torch.__version__}
    for peer in PEERS:
        module = _import(peer)
        versions[peer] = "not installed" if isinstance(module, Unavailable) else module.__version__
    return versions


def export_for_peers(model, folder: str | os.PathLike) -> Path:
    """The fp32 ONNX file (dynamic batch) of a ViTReference that both peers read, written
    into `folder` and verified against the model. Raises ExportError when the export fails."""
    path = Path(folder) / "model.onnx"
    export_model(model, path, format="onnx", dtype="fp32", dynamic_batch=True)
    return path


class PeerRunner:
    """Calls a peer on a torch batch. The peers take fp32 numpy arrays: the conversion of a
    batch is made on its first call and kept (the warm-up calls pay it, the timed calls do
    not), so the timing is the peer's own."""

    def __init__(self, peer: str, dtype: torch.dtype, threads: int, note: str = ""):
        self.peer, self.dtype, self.threads, self.note = peer, dtype, threads, note
        self._inputs: dict[tuple, np.ndarray] = {}

    def _array(self, images: torch.Tensor) -> np.ndarray:
        key = (images.data_ptr(), tuple(images.shape), images.dtype)
        if key not in self._inputs:
            self._inputs = {key: images.detach().to("cpu", torch.float32).numpy()}
        return self._inputs[key]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self._run(self._array(images))))


class OnnxRuntimeRunner(PeerRunner):
    def __init__(self, session, dtype, threads):
        super().__init__("onnxruntime", dtype, threads)
        self.session = session

    def _run(self, array):
        return self.session.run(None, {INPUT_NAME: array})[0]


class OpenVinoRunner(PeerRunner):
    """One compiled model per batch size (OpenVINO runs a static shape fastest: it is what a
    deployment compiles), made on the first batch of that size."""

    def __init__(self, core, model, dtype, threads, profile: bool = False):
        super().__init__("openvino", dtype, threads)
        self.core, self.model, self.profile = core, model, profile
        self.requests: dict[tuple, object] = {}

    def config(self) -> dict:
        config = {"INFERENCE_NUM_THREADS": self.threads, "NUM_STREAMS": 1,
                  "INFERENCE_PRECISION_HINT": OPENVINO_PRECISION[self.dtype]}
        if self.profile:
            config["PERF_COUNT"] = True
        return config

    def request(self, shape: tuple):
        if shape not in self.requests:
            model = self.model.clone()
            model.reshape({0: list(shape)})
            compiled = self.core.compile_model(model, "CPU", self.config())
            # OpenVINO falls back to f32 without saying so where the CPU lacks native bf16
            used = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
            if used != OPENVINO_PRECISION[self.dtype]:
                self.note = f"OpenVINO runs {used} (asked {OPENVINO_PRECISION[self.dtype]})"
            self.requests[shape] = compiled.create_infer_request()
        return self.requests[shape]

    def _run(self, array):
        request = self.request(array.shape)
        request.infer({0: array})
        return request.get_output_tensor(0).data


def open_peer(peer: str, onnx_path: str | os.PathLike | None, dtype: torch.dtype, threads: int,
              profile: bool = False, export_error: str | None = None) -> PeerRunner | Unavailable:
    """A runner of `peer` on the ONNX file, or the reason it cannot run: not installed, no
    kernels in this dtype, the export failed (`export_error`), or the file does not load."""
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")
    if dtype not in DTYPE_NAMES:
        return Unavailable(peer, f"the peers run fp32 and bf16, not {dtype}")
    module = _import(peer)
    if isinstance(module, Unavailable):
        return module
    if peer == "onnxruntime" and dtype != torch.float32:
        return Unavailable(peer, "onnxruntime's CPU provider has no bf16 kernels (fp32 only)")
    if export_error is not None or onnx_path is None:
        return Unavailable(peer, f"no model to load: {export_error or 'the ONNX export did not run'}")
    try:
        if peer == "onnxruntime":
            from .export import onnx_session
            return OnnxRuntimeRunner(onnx_session(onnx_path, threads=threads), dtype, threads)
        core = module.Core()
        return OpenVinoRunner(core, core.read_model(str(onnx_path)), dtype, threads, profile)
    except Exception as err:  # the runtimes' own error types for files they cannot read
        return Unavailable(peer, f"cannot load {Path(onnx_path).name}: {_first_line(err)}")


def export_when_needed(model, folder: str | os.PathLike, peers=PEERS) -> tuple[Path | None, str | None]:
    """The ONNX file of `model` (a ViTReference) for `peers`, exported into `folder`, or why
    not: (path, None) or (None, reason). Skipped, as (None, None), when none of them is
    installed, so its cost is not paid for nothing. One file serves every dtype."""
    if all(isinstance(_import(p), Unavailable) for p in peers):
        return None, None
    try:
        return export_for_peers(model, folder), None
    except ExportError as err:
        return None, f"the ONNX export failed: {_first_line(err)}"


def open_peers(onnx_path, export_error: str | None, dtype: torch.dtype, threads: int, peers=PEERS,
               profile: bool = False) -> dict[str, PeerRunner | Unavailable]:
    """Each of `peers` on the file export_when_needed returned (or its reason)."""
    return {peer: open_peer(peer, onnx_path, dtype, threads, profile, export_error) for peer in peers}
