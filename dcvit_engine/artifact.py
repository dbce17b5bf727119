"""Artifact folders: spec.json + model.safetensors (+ preprocess.json, report.json).

preprocess.json is the teacher's PreprocessConfig (how images are fed to the model);
artifacts written before it existed load with a one-line notice and timm's ImageNet default.

save() writes into a temporary sibling folder and renames it into place, so a
reader never sees a half-written artifact and a failed save leaves the old one.
load() refuses any file that does not match its spec, naming every offending tensor.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

from .adapter import from_timm
from .atomic import atomic_folder
from .errors import InputError
from .jsonfile import load_json_file
from .preprocess import PreprocessConfig, config_from_timm, default_with_notice, imagenet_default
from .reference import ViTReference, state_shapes
from .spec import SPEC_FILENAME, SPEC_VERSION, ViTSpec

WEIGHTS_FILENAME = "model.safetensors"
REPORT_FILENAME = "report.json"
PREPROCESS_FILENAME = "preprocess.json"


def _spec_and_state(model) -> tuple[ViTSpec, dict[str, torch.Tensor]]:
    if isinstance(model, ViTReference):
        return model.spec, model.state_dict()
    from timm.models.vision_transformer import VisionTransformer
    if isinstance(model, VisionTransformer):
        return from_timm(model)
    raise TypeError(f"save() takes a timm VisionTransformer or a dcvit_engine ViTReference, "
                    f"got {type(model).__name__}")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _check_replaceable(path: Path) -> None:
    """Only an earlier artifact may be replaced, never an unrelated file or folder."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir() or path.is_symlink():
        raise FileExistsError(f"{path} exists and is not an artifact folder; choose another path")
    entries = set(os.listdir(path))
    if entries and SPEC_FILENAME not in entries:
        raise FileExistsError(f"{path} is a non-empty folder without {SPEC_FILENAME}; refusing to "
                              "replace it (choose another path or remove it yourself)")


def _preprocess_of(model, given: PreprocessConfig | None, spec: ViTSpec) -> PreprocessConfig | None:
    """The config to store: the one given, a timm model's own, or the one a loaded model
    carries (model.preprocess); it must describe the spec's input."""
    config = given
    if config is None:
        config = getattr(model, "preprocess", None)
    if config is None and not isinstance(model, ViTReference):
        config = config_from_timm(model)
    if config is not None and config.input_size != (spec.in_chans, *_pair(spec.img_size)):
        raise InputError(f"the preprocessing config's input_size {config.input_size} is not the model's "
                         f"input {(spec.in_chans, *_pair(spec.img_size))}")
    return config


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def save(model, path: str | os.PathLike, report: dict | None = None,
         preprocess: PreprocessConfig | None = None) -> Path:
    """Write `model` (timm ViT or ViTReference) as an artifact folder at `path`, with the
    preprocessing config `preprocess` (default: a timm model's own, or model.preprocess)."""
    spec, state = _spec_and_state(model)
    spec.validate()
    spec_text = spec.to_json()
    config = _preprocess_of(model, preprocess, spec)
    report_text = None
    if report is not None:
        try:
            report_text = json.dumps(report, indent=2)
        except (TypeError, ValueError) as err:
            raise TypeError(f"report must be JSON-serialisable: {err}") from None
    # safetensors needs contiguous CPU tensors that share no storage
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in state.items()}

    path = Path(path)
    _check_replaceable(path)
    with atomic_folder(path) as staging:
        _write_text(staging / SPEC_FILENAME, spec_text)
        # serialized in memory and written by Python, so a full disk or a permission is an
        # OSError naming the path (safetensors' own writer raises an opaque error)
        (staging / WEIGHTS_FILENAME).write_bytes(
            save_bytes(tensors, metadata={"format": "pt", "dcvit_spec_version": str(SPEC_VERSION)}))
        _fsync_file(staging / WEIGHTS_FILENAME)
        if report_text is not None:
            _write_text(staging / REPORT_FILENAME, report_text)
        if config is not None:
            _write_text(staging / PREPROCESS_FILENAME, json.dumps(config.to_dict(), indent=2))
    return path


def _artifact_folder(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no artifact at {path} (expected a folder written by dcvit_engine.save)")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not an artifact folder (expected a folder with "
                                 f"{SPEC_FILENAME} and {WEIGHTS_FILENAME})")
    return path


def load_spec(path: str | os.PathLike) -> ViTSpec:
    """The spec of the artifact folder at `path`."""
    return ViTSpec.load(_artifact_folder(path))


def load_report(path: str | os.PathLike) -> dict | None:
    """The report saved with the artifact, or None when it was saved without one."""
    file = _artifact_folder(path) / REPORT_FILENAME
    if not file.is_file():
        return None
    return load_json_file(file, hint="the artifact is corrupt")


def load_preprocess(path: str | os.PathLike, spec: ViTSpec | None = None,
                    notice: bool = True) -> PreprocessConfig:
    """The preprocessing config stored with the artifact; for an artifact saved without one,
    timm's ImageNet default at the model's input size (with a one-line notice on stderr)."""
    folder = _artifact_folder(path)
    spec = load_spec(folder) if spec is None else spec
    file = folder / PREPROCESS_FILENAME
    if not file.is_file():
        if notice:
            return default_with_notice(spec.img_size, spec.in_chans, f"{folder} (no {PREPROCESS_FILENAME})")
        return imagenet_default(spec.img_size, spec.in_chans)
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{file} is not valid JSON ({err}); the artifact is corrupt") from None
    try:
        config = PreprocessConfig.from_dict(values, where=str(file))
    except (TypeError, ValueError) as err:
        raise InputError(f"{file}: {err}; fix or remove it") from None
    if config.input_size != (spec.in_chans, *_pair(spec.img_size)):
        raise InputError(f"{file} describes input {config.input_size} but the spec's input is "
                         f"{(spec.in_chans, *_pair(spec.img_size))}; the artifact is corrupt")
    return config


def _check_tensors(spec: ViTSpec, tensors: dict[str, torch.Tensor], file: Path) -> None:
    expected = state_shapes(spec)
    problems = []
    for name in sorted(set(expected) - set(tensors)):
        problems.append(f"missing {name} {expected[name]}")
    for name in sorted(set(tensors) - set(expected)):
        problems.append(f"unexpected {name} {tuple(tensors[name].shape)}")
    for name in sorted(set(expected) & set(tensors)):
        if tuple(tensors[name].shape) != expected[name]:
            problems.append(f"{name} has shape {tuple(tensors[name].shape)}, spec needs {expected[name]}")
        elif not tensors[name].is_floating_point():
            problems.append(f"{name} has dtype {tensors[name].dtype}, expected floating point")
    if problems:
        raise InputError(f"{file} does not match spec.json ({len(problems)} problem(s)): "
                         + "; ".join(problems))


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> ViTReference:
    """The ViTReference stored in the artifact folder at `path`, in eval mode on `device`;
    model.preprocess is its preprocessing config, None for an artifact saved before they
    carried one (the commands then use the ImageNet default and say so, when they read images)."""
    folder = _artifact_folder(path)
    spec = load_spec(folder)
    file = folder / WEIGHTS_FILENAME
    if not file.is_file():
        raise FileNotFoundError(f"{folder} has no {WEIGHTS_FILENAME}; the artifact is incomplete, re-save it")
    try:
        tensors = load_file(str(file), device=str(device))
    except Exception as err:  # safetensors raises its own error types for corrupt headers/data
        raise InputError(f"{file} is not a readable safetensors file ({err}); the artifact is "
                         "corrupt, re-save the model") from None
    _check_tensors(spec, tensors, file)
    model = ViTReference.from_state(spec, tensors)
    model.preprocess = load_preprocess(folder, spec) if (folder / PREPROCESS_FILENAME).is_file() else None
    return model.eval()
