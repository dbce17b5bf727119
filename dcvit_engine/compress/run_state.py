"""The resumable run state of a multi-step compression run (not model weight files: those
are dcvit_engine/checkpoints.py), so that an interrupted run can resume.

A checkpoint folder holds state.json (what is done: scores, compressed blocks, losses,
timings, and the settings of the run) and one artifact folder with the model after the
last completed step. A step is committed by first saving the new artifact under a new
name, then atomically replacing state.json to point at it, and only then deleting the
previous artifact: whatever moment a run dies, state.json names a complete artifact.

state.json is read as untrusted: the artifact it names must be a direct child of the folder
named as this module names them (model-0001, ...), never a path, never a symbolic link, so a
tampered state can neither make a resume read another folder nor make a commit delete one.
Nothing outside the checkpoint folder is ever deleted.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

from ..artifact import load as load_artifact
from ..artifact import save as save_artifact
from ..atomic import atomic_open
from ..errors import RunStateError
from ..jsonfile import load_json_file
from ..reference import ViTReference
from ..runlock import LOCK_FILENAME

STATE_FILENAME = "state.json"
METRIC_SET_FILENAME = "metric_set.pt"
METRIC_SET_PROGRESS = METRIC_SET_FILENAME + ".progress"  # metric_set.progress_file: the unfinished synthesis
STATE_FORMAT = 1
ARTIFACT_NAME = re.compile(r"model-[0-9]{4,9}")  # what commit() names a saved model


def tensor_digest(*tensors: torch.Tensor) -> str:
    """A short content hash (dtypes, shapes, bytes): a checkpoint only resumes with the very same
    teacher and images, and a cached metric set belongs to the very same teacher."""
    digest = hashlib.blake2b(digest_size=12)
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def model_digest(model: ViTReference) -> str:
    digest = hashlib.blake2b(model.spec.to_json().encode(), digest_size=12).hexdigest()
    return digest + tensor_digest(*model.state_dict().values())


def _write_json_atomically(path: Path, data: dict) -> None:
    with atomic_open(path, encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2))


class RunCheckpoint:
    """The state of one run, kept in memory and (with a folder) on disk after every step.

    config: the settings that define the run (JSON data); resuming with other settings is
    refused, naming what differs. Without a folder nothing is written and nothing resumes.
    """

    def __init__(self, folder: str | os.PathLike | None, config: dict, resume: bool = False):
        self.folder = None if folder is None else Path(folder)
        self.config = json.loads(json.dumps(config))  # plain JSON types, as they compare after loading
        self.state: dict = {"format": STATE_FORMAT, "config": self.config, "artifact": None}
        self.resumed = False
        if self.folder is None:
            return
        state_file = self.folder / STATE_FILENAME
        if self.folder.is_symlink():
            raise RunStateError(f"checkpoint folder {self.folder} is a symbolic link; a run keeps its "
                                "checkpoints in a folder of its own: remove the link or choose another path")
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"checkpoint folder {self.folder} is a file; choose another path")
        if state_file.is_file():
            if not resume:
                raise FileExistsError(f"{self.folder} holds the checkpoint of an earlier run; resume it "
                                      "(resume=True, --resume) or remove the folder to start over")
            self._load(state_file)
        elif self.folder.exists() and any(p.name not in (METRIC_SET_FILENAME, METRIC_SET_PROGRESS,
                                                         LOCK_FILENAME) for p in self.folder.iterdir()):
            raise FileExistsError(f"{self.folder} is a non-empty folder without {STATE_FILENAME}; "
                                  "choose an empty or new checkpoint folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.resumed:  # at once: an interruption before the first step still leaves a resumable run
            self.commit()

    def _load(self, state_file: Path) -> None:
        start_over = f"remove {self.folder} to start over"
        state = load_json_file(state_file, hint=start_over)
        if state.get("format") != STATE_FORMAT:
            raise RunStateError(f"{state_file} is not a dcvit_engine run state (format {STATE_FORMAT}); "
                                f"{start_over}")
        # the paths it names first: a tampered state is refused before anything else
        saves, name = state.get("saves", 0), state.get("artifact")
        if not isinstance(saves, int) or isinstance(saves, bool) or saves < 0:
            raise RunStateError(f"{state_file}: 'saves' must be a count, got {saves!r}; {start_over}")
        if name is not None:
            self._artifact_path(name, state_file)
        saved = state.get("config", {})
        if not isinstance(saved, dict):
            raise RunStateError(f"{state_file}: 'config' is not a JSON object; {start_over}")
        differ = sorted(k for k in set(saved) | set(self.config) if saved.get(k) != self.config.get(k))
        if differ:
            detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {self.config.get(k)!r}"
                               for k in differ)
            raise RunStateError(f"cannot resume from {self.folder}: the run's settings differ ({detail}); "
                                "use the same settings or remove the folder to start over")
        self.state = state
        self.resumed = True

    def _artifact_path(self, name, state_file: Path | None = None) -> Path:
        """The folder of the saved model `name`, refused unless it is this run's own: a direct
        child named as commit() names it, not a symbolic link, a folder."""
        where = state_file or self.folder / STATE_FILENAME
        if not isinstance(name, str) or not ARTIFACT_NAME.fullmatch(name):
            raise RunStateError(f"{where} names {name!r} as the saved model, which is not a model folder "
                                f"of this run (expected model-NNNN inside {self.folder}); it was not written "
                                f"by dcvit_engine: remove {self.folder} to start over")
        path = self.folder / name
        if path.is_symlink() or not path.is_dir():
            what = "a symbolic link" if path.is_symlink() else "missing"
            raise RunStateError(f"{where} names {path} as the saved model, but it is {what}; remove "
                                f"{self.folder} to start over")
        return path

    @property
    def metric_set_path(self) -> Path | None:
        """Where the synthesized metric set is cached (None without a folder); a symbolic link
        there is refused (it would make a resume read a file outside the run's folder)."""
        if self.folder is None:
            return None
        path = self.folder / METRIC_SET_FILENAME
        for file in (path, self.folder / METRIC_SET_PROGRESS):
            if file.is_symlink():
                raise RunStateError(f"{file} is a symbolic link, not this run's own metric set; remove "
                                    f"{self.folder} to start over")
        return path

    def model(self, device: str | torch.device = "cpu") -> ViTReference | None:
        """The model after the last committed step, or None if no step saved one."""
        name = self.state.get("artifact")
        if self.folder is None or name is None:
            return None
        return load_artifact(self._artifact_path(name), device=device)

    def commit(self, model: ViTReference | None = None) -> None:
        """Persist the current state (and the model, if given) as the last complete checkpoint."""
        if self.folder is None:
            return
        previous = self.state.get("artifact")
        if model is not None:
            step = int(self.state.get("saves", 0)) + 1
            name = f"model-{step:04d}"
            save_artifact(model, self.folder / name)
            self.state.update(artifact=name, saves=step)
        _write_json_atomically(self.folder / STATE_FILENAME, self.state)
        if model is not None and previous is not None and previous != self.state["artifact"]:
            shutil.rmtree(self._artifact_path(previous), ignore_errors=True)
