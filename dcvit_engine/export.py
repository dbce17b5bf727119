"""Export a (compressed) ViT to ONNX or to a torch.export program (.pt2), verified first.

The exported graph is the reference module's (plain PyTorch, token merges included: see
exportable_merge), so the file runs without dcvit_engine: ONNX in onnxruntime, .pt2 with
`torch.export.load(FILE).module()`. export_model() writes to a temporary file beside the
target, runs it on random images next to the reference module, and renames it into place
only when the outputs (logits, or CAIT's full-resolution features) agree within the
dtype's tolerance; otherwise nothing is written.
"""
from __future__ import annotations

import copy
import importlib
import io
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.fx.experimental.symbolic_shapes import ConstraintViolationError

from .atomic import atomic_path
from .dtypes import SHORT_DTYPES
from .errors import InputError
from .kernels.token_merge import atme_unmerge_ref
from .reference import ViTReference
from .spec import merge_schedule

FORMATS = ("onnx", "pt2")
DTYPES = SHORT_DTYPES  # the names an export takes (dtypes.py)
# onnxruntime's CPU provider, which runs the verification, has no bf16 kernels for most ops
FORMAT_DTYPES = {"onnx": ("fp32", "fp16"), "pt2": ("fp32", "fp16", "bf16")}
# Verification bound on max |exported - reference| / max |reference| over the outputs. fp32:
# the bound (measured: ~4e-7). fp16/bf16: a few units of the format's rounding of
# the largest logit, as two runtimes order their sums differently.
TOLERANCES = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
# The torch.onnx exporter emits opset 18 and up (LayerNormalization, ScatterElements add).
MIN_OPSET = 18
DEFAULT_OPSET = 18
EXPORT_EXTRA = 'pip install -e ".[export]"'
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
INPUT_NAME = "images"
# what the exported model returns, and the name of its ONNX output
OUTPUTS = {"logits": "logits", "full-features": "features"}
DYNAMIC_CHECK_BATCHES = (1, 3)  # a dynamic-batch export is verified at two batch sizes


class ExportError(InputError):
    """A refused or failed export; nothing was written."""


class FullResolutionFeatures(torch.nn.Module):
    """CAIT's dense-prediction output (compress.cait.full_resolution_features): the final
    tokens with every ATME merge undone, (B, prefix + H * W, D) on the input grid. Written
    with atme_unmerge_ref so that the traced graph holds plain torch ops only."""

    def __init__(self, model: ViTReference):
        super().__init__()
        self.model = model
        schedule = merge_schedule(model.spec)
        self.unmerges = [(grid_in, block.merge.axis) for block, (_, _, grid_in)
                         in zip(model.spec.blocks, schedule) if block.merge is not None][::-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(images)
        for grid_in, axis in self.unmerges:
            tokens = atme_unmerge_ref(tokens, grid_in, axis, self.model.spec.num_prefix_tokens)
        return tokens


def _check_unmergeable(model: ViTReference) -> None:
    for i, block in enumerate(model.spec.blocks):
        if block.merge is not None and block.merge.kind != "atme":
            raise ExportError(f"--output full-features needs the token grid, but block {i} merges with "
                              f"{block.merge.kind} (only ATME merges can be undone); export the logits")


@dataclass(frozen=True)
class ExportResult:
    path: str
    format: str
    output: str
    dtype: str
    batch: int | None          # None: dynamic
    checked_batches: tuple[int, ...]
    max_abs_diff: float
    max_rel_diff: float        # max |exported - reference| / max |reference| over the outputs
    tolerance: float
    export_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def require_onnx() -> None:
    """Raises ExportError naming the install command when the export extra is missing."""
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"ONNX export needs {', '.join(missing)}: install them with {EXPORT_EXTRA}")


def check_options(format: str, dtype: str, batch_size: int | None, dynamic_batch: bool,
                  opset: int | None, output: str = "logits") -> None:
    """Refuses option combinations before any work (ExportError, one line)."""
    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if output not in OUTPUTS:
        raise ExportError(f"unknown output {output!r}; choose one of {', '.join(OUTPUTS)}")
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype not in FORMAT_DTYPES[format]:
        raise ExportError(f"{format} export cannot take {dtype} (onnxruntime's CPU provider has no "
                          f"{dtype} kernels to verify it); choose one of {', '.join(FORMAT_DTYPES[format])}")
    if dynamic_batch and batch_size is not None:
        raise ExportError("give either --batch-size N or --dynamic-batch, not both")
    if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
        raise ExportError(f"--batch-size must be >= 1, got {batch_size}")
    if opset is not None:
        if format != "onnx":
            raise ExportError(f"--opset applies to ONNX only, not to {format}")
        if opset < MIN_OPSET:
            raise ExportError(f"--opset must be >= {MIN_OPSET} (the torch.onnx exporter's minimum), "
                              f"got {opset}")
        if importlib.util.find_spec("onnx") is not None:
            import onnx
            newest = onnx.defs.onnx_opset_version()
            if opset > newest:
                raise ExportError(f"--opset {opset} is newer than the installed onnx supports ({newest})")


def _images(spec, batch: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, spec.in_chans, *spec.img_size, generator=generator).to(dtype)


def _export_program(model: torch.nn.Module, example: torch.Tensor, dynamic: bool):
    if not dynamic:
        return torch.export.export(model, (example,), strict=False)
    try:
        return torch.export.export(model, (example,), strict=False,
                                   dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    except Exception as err:
        # torch.export reports a batch that the graph fixed as "Constraints violated" (a
        # UserError from torch._dynamo, or ConstraintViolationError); both merge kinds of this
        # project keep a batch-independent token count, so this is some other specialization
        if "Constraints violated" not in str(err) and not isinstance(err, ConstraintViolationError):
            raise
        raise ExportError("this model cannot be exported with a dynamic batch (the exporter "
                          "fixed its batch size); export with --batch-size N") from err


def _write_onnx(program, example, path: Path, opset: int, output_name: str) -> None:
    require_onnx()
    onnx_program = torch.onnx.export(program, (example,), dynamo=True, opset_version=opset,
                                     input_names=[INPUT_NAME], output_names=[output_name],
                                     optimize=True, verbose=False)
    _name_batch_axis(onnx_program.model)
    # one self-contained file: an external weights file would not move with the rename
    onnx_program.save(str(path), external_data=False)


def _name_batch_axis(model) -> None:
    """The exporter names a dynamic batch after its internal symbol ("s77"); users and tools
    read `batch`. Renames that symbol on every value of the graph (an onnx_ir model)."""
    import onnx_ir as ir

    first = model.graph.inputs[0].shape
    if first is None or not isinstance(first[0], ir.SymbolicDim) or first[0].value is None:
        return  # a static batch
    symbol = first[0].value
    values = list(model.graph.inputs) + list(model.graph.outputs)
    values += [v for node in model.graph.all_nodes() for v in node.outputs]
    for value in values:
        if value.shape is not None and any(isinstance(d, ir.SymbolicDim) and d.value == symbol
                                           for d in value.shape):
            value.shape = ir.Shape([ir.SymbolicDim("batch") if isinstance(d, ir.SymbolicDim) and
                                    d.value == symbol else d for d in value.shape])


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session of an exported file."""
    require_onnx()
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers are not the user's
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _runner(format: str, path: Path):
    """A function images -> outputs running the file at `path`, as its users would load it."""
    if format == "onnx":
        session = onnx_session(path)
        return lambda images: torch.from_numpy(session.run(None, {INPUT_NAME: images.numpy()})[0])
    module = torch.export.load(str(path)).module()
    return lambda images: module(images)


def _compare(run, model, spec, batches, dtype) -> tuple[float, float]:
    max_abs = max_rel = 0.0
    for seed, batch in enumerate(batches):
        images = _images(spec, batch, dtype, seed=1000 + seed)
        with torch.no_grad():
            expected = model(images).float()
            got = run(images).float()
        if got.shape != expected.shape:
            raise ExportError(f"the exported model returned outputs of shape {tuple(got.shape)} for a "
                              f"batch of {batch}, the reference {tuple(expected.shape)}")
        diff = (got - expected).abs().max().item()
        if diff != diff:  # NaN
            raise ExportError("the exported model returned NaN; nothing written")
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / max(expected.abs().max().item(), 1e-30))
    return max_abs, max_rel


def _chmod_as_new_file(path: Path) -> None:
    # the temporary file was created private (0600); give it a new file's usual mode
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def export_model(model: ViTReference, out: str | os.PathLike, format: str = "onnx",
                 dtype: str = "fp32", batch_size: int | None = None, dynamic_batch: bool = False,
                 opset: int | None = None, output: str = "logits") -> ExportResult:
    """Export `model` to `out` and verify it (see the module docstring). batch_size: the
    static batch (default 1) unless dynamic_batch. output: "logits", or "full-features"
    (FullResolutionFeatures, for models without ToMe merges). Raises ExportError and writes
    nothing when an option is refused or the exported outputs differ from the reference's."""
    check_options(format, dtype, batch_size, dynamic_batch, opset, output)
    if not isinstance(model, ViTReference):
        raise ExportError(f"export takes a dcvit_engine ViTReference (dcvit_engine.load), got "
                          f"{type(model).__name__}")
    if output == "full-features":
        _check_unmergeable(model)
    if format == "onnx":
        require_onnx()
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"{out} is a folder; --out takes a file name")
    torch_dtype = DTYPES[dtype]
    # a copy: the caller's module keeps its dtype and device
    model = copy.deepcopy(model).to(device="cpu", dtype=torch_dtype).eval()
    spec = model.spec
    if output == "full-features":
        model = FullResolutionFeatures(model).eval()
    batch = batch_size or 1
    # a dynamic dimension of example size 1 would be specialized away: trace with 2 images
    example = _images(spec, 2 if dynamic_batch else batch, torch_dtype, seed=0)
    batches = DYNAMIC_CHECK_BATCHES if dynamic_batch else (batch,)
    begin = time.perf_counter()
    with atomic_path(out) as tmp:
        try:
            with torch.no_grad():
                program = _export_program(model, example, dynamic_batch)
                if format == "onnx":
                    _write_onnx(program, example, tmp, opset or DEFAULT_OPSET, OUTPUTS[output])
                else:
                    # serialized in memory, written by Python: torch's file writer aborts the
                    # process (SIGABRT) when the disk fills; a Python write raises ENOSPC
                    buffer = io.BytesIO()
                    torch.export.save(program, buffer)
                    tmp.write_bytes(buffer.getbuffer())
        except (ExportError, KeyboardInterrupt):
            raise
        except OSError as err:
            if err.errno is None:
                raise ExportError(f"{format} export failed: {err}") from err
            raise  # the disk or a permission, not the exporter: the CLI names the path and cause
        except Exception as err:  # the exporters raise many types, with long multi-line texts
            first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
            raise ExportError(f"{format} export failed: {first.strip()}") from err
        export_s = time.perf_counter() - begin
        max_abs, max_rel = _compare(_runner(format, tmp), model, spec, batches, torch_dtype)
        tolerance = TOLERANCES[dtype]
        if not max_rel <= tolerance:
            raise ExportError(f"verification failed: exported {output} differ from the reference module "
                              f"by {max_rel:.3g} relative (max abs {max_abs:.3g}), above the {dtype} "
                              f"tolerance {tolerance:g}; nothing written")
        _chmod_as_new_file(tmp)
    return ExportResult(path=str(out), format=format, output=output, dtype=dtype,
                        batch=None if dynamic_batch else batch, checked_batches=tuple(batches),
                        max_abs_diff=max_abs, max_rel_diff=max_rel, tolerance=tolerance,
                        export_s=export_s)
