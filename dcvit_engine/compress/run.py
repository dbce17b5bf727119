"""The run scaffold every compression method's entry point is built on, and the one report
schema all methods write.

    def compress_foo(model, images, target_macs, *, iters=100, device=None, seed=0,
                     checkpoint_dir=None, resume=False, progress=False, report=None):
        run = MethodRun("foo", model, images, target_macs, device=device, progress=progress)
        ckpt = run.checkpoint(checkpoint_dir, resume, dict(iters=iters, seed=seed))
        ...  # run.teacher (a ViTReference on run.device, eval mode), run.log(...), ckpt.commit(student)
        return run.finish(student, report, finetune_iters=..., extras=dict(...))

MethodRun gives every method the same checks (the target, the images' shape, dtype and
NaN/Inf, NaN/Inf teacher outputs on them: one-line ValueErrors), the same device choice
(devices.resolve_device), progress lines, the per-step run checkpoint (checkpoint.RunCheckpoint,
keyed by the settings and the teacher's and images' digests) and the report below.

The report (REPORT_FORMAT 2), the same keys for every method:
  method, report_format;
  target_macs: {"ratio", "macs"} asked for (None when the method was given no target, e.g.
      ToMe with r); teacher_macs, achieved_macs, achieved_ratio (dcvit_engine.macs counts);
  structure: per block of the student, its attention heads and q/k and v widths (None when
      removed), MLP hidden width and token merge;
  finetune_iters: {"student", "per_step", "steps", "selection"}: iterations that trained the
      student, and those spent choosing its structure (block scoring, search, gate learning);
  timings: seconds per phase and total_s; settings: the run's options; num_images; device;
      resumed;
  extras: everything method-specific (plans, scores, chosen blocks, losses, search state).
`dcvit compress` adds CLI_KEYS (the model, the data, load and wall time) to the saved report.
Reports of format 1 (before this scaffold) are read with `upgrade_report`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..data import nonfinite_rows, refuse_nonfinite
from ..devices import resolve_device
from ..errors import InputError
from ..macs import count_macs
from ..reference import ViTReference
from .checkpoint import RunCheckpoint, model_digest, tensor_digest
from .fewshot import ProgressLog, as_reference, check_images, on_device
from .finetune import kd_finetune
from .structure import check_target_ratio

REPORT_FORMAT = 2
COMMON_KEYS = ("method", "report_format", "target_macs", "teacher_macs", "achieved_macs", "achieved_ratio",
               "structure", "finetune_iters", "timings", "settings", "num_images", "device", "resumed",
               "extras")
CLI_KEYS = ("model", "data", "num_samples", "load_s", "wall_s")  # what `dcvit compress` adds


@dataclass(frozen=True)
class CliOption:
    """How `dcvit compress` (and `dcvit plan`) offer one keyword option of a method: a method
    module's CLI_OPTIONS maps option names to these. The CLI adds each method's default, read
    off its signature; type defaults to the type of that default."""
    help: str
    type: Callable | None = None
    choices: tuple | None = None
    flag: str | None = None      # default: --option-name
    metavar: str | None = None


def block_list(text: str) -> list[int]:
    """'1,2,5' -> [1, 2, 5]: block indices as the command line gives them (--candidates)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--candidates takes block indices separated by commas (e.g. 1,2,3), "
                         f"got {text!r}") from None


def block_structure(spec) -> list[dict]:
    """The report's `structure`: what each block of `spec` keeps."""
    out = []
    for block in spec.blocks:
        attn = block.attn
        merge = block.merge
        out.append(dict(
            heads=0 if attn is None else attn.num_heads,
            qk=None if attn is None else list(attn.qk_dims), v=None if attn is None else list(attn.v_dims),
            mlp_hidden=block.mlp_hidden,
            merge=None if merge is None else (dict(kind="tome", r=merge.r) if merge.kind == "tome"
                                              else dict(kind=merge.kind, axis=merge.axis))))
    return out


@torch.no_grad()
def check_teacher_outputs(teacher: ViTReference, images: torch.Tensor, device, batch_size: int = 64) -> None:
    """A teacher whose outputs are NaN/Inf on the images is refused before any work."""
    was_training = teacher.training
    teacher.eval()
    try:
        bad = sum(nonfinite_rows(teacher(images[i:i + batch_size].to(device)))
                  for i in range(0, images.shape[0], batch_size))
    finally:
        teacher.train(was_training)
    refuse_nonfinite(images.shape[0], bad_outputs=bad, model="the teacher")


class MethodRun:
    """One compression run (see the module docstring).

    images_required: False for training-free methods (images may be None; given ones are
    still checked). head_required: the method compares class distributions, so the teacher
    needs its classifier. move: False keeps the teacher where it is (a method that computes
    nothing on it), else it is copied to the chosen device.
    """

    def __init__(self, method: str, model, images, target_macs, *, device=None, progress: bool = False,
                 target_required: bool = True, images_required: bool = True, head_required: bool = True,
                 move: bool = True):
        self.method = method
        self.started = time.perf_counter()
        self.target_ratio = (None if target_macs is None and not target_required
                             else check_target_ratio(target_macs))
        teacher = as_reference(model, head_required=head_required)
        self.spec = teacher.spec
        self.images = images
        if images is not None or images_required:
            check_images(images, self.spec)
        self.device = resolve_device(device) if move else next(teacher.parameters()).device
        self.teacher = on_device(teacher, self.device).eval()
        self.device = next(self.teacher.parameters()).device  # "cuda" -> "cuda:0": compares equal
        if images is not None:
            check_teacher_outputs(self.teacher, images, self.device)
        self.teacher_macs = count_macs(self.spec).total
        self.log = ProgressLog(progress, method)
        self.settings: dict = {}
        self.resumed = False

    def checkpoint(self, folder, resume: bool, settings: dict, **digests) -> RunCheckpoint:
        """The run's checkpoint (RunCheckpoint) in `folder` (None: nothing written). A resume
        must have the same settings, teacher and images (and `digests`: name -> tensor or None)."""
        self.settings = dict(settings)
        config = dict(method=self.method, **settings, teacher=model_digest(self.teacher),
                      images=None if self.images is None else tensor_digest(self.images),
                      **{k: None if v is None else tensor_digest(v) for k, v in digests.items()})
        ckpt = RunCheckpoint(folder, config, resume)
        self.resumed = ckpt.resumed
        return ckpt

    def step(self, ckpt: RunCheckpoint, name: str, work: Callable[[], tuple[ViTReference, dict]]
             ) -> tuple[ViTReference, dict]:
        """One checkpointed step: work() -> (model, record as JSON data), committed with its time
        under timings[name + "_s"]; a resumed run that finished the step gets the saved model
        and record back without running it again."""
        state = ckpt.state
        timings = state.setdefault("timings", {})
        if name in state:
            self.log(f"{name}: done before the resume, loaded from {ckpt.folder}")
            return ckpt.model(self.device), state[name]
        start = time.perf_counter()
        model, record = work()
        timings[f"{name}_s"] = time.perf_counter() - start
        state[name] = json.loads(json.dumps(record))  # as it will read back after a resume
        ckpt.commit(model)
        return model, state[name]

    def distill_step(self, ckpt: RunCheckpoint, student: ViTReference, labels, *, iters: int, batch_size: int,
                     lr: float, weight_decay: float, seed: int) -> tuple[ViTReference, list[float]]:
        """The checkpointed "finetune" step of a structure-search method: finetune.kd_finetune of
        the student against the teacher on the run's images (nothing when iters is 0)."""
        def work():
            losses = kd_finetune(student, self.teacher, self.images, labels=labels, iters=iters,
                                 batch_size=batch_size, lr=lr, weight_decay=weight_decay, device=self.device,
                                 seed=seed, progress=self.log.enabled) if iters else []
            return student, dict(losses=[float(v) for v in losses])

        self.log(f"finetuning {iters} steps")
        student, record = self.step(ckpt, "finetune", work)
        return student, record["losses"]

    def distill_and_finish(self, ckpt: RunCheckpoint, student: ViTReference, report: dict | None, labels, *,
                           iters: int, selection: int, batch_size: int, lr: float, weight_decay: float,
                           seed: int, extras: dict) -> ViTReference:
        """How a search-then-finetune method (UVC, CAIT) ends: distill_step, then finish with
        `iters` finetuning iterations in one step after `selection` search iterations."""
        student, losses = self.distill_step(ckpt, student, labels, iters=iters, batch_size=batch_size, lr=lr,
                                            weight_decay=weight_decay, seed=seed)
        return self.finish(student, report, timings=ckpt.state["timings"],
                           finetune_iters=dict(student=iters, per_step=iters, steps=1, selection=selection),
                           extras=dict(extras, finetune_losses=losses))

    def finish(self, student: ViTReference, report: dict | None, *, finetune_iters: dict | None = None,
               timings: dict | None = None, extras: dict | None = None) -> ViTReference:
        """The student in eval mode; `report` (when given) receives the common report."""
        student.eval()
        if report is not None:
            achieved = count_macs(student.spec).total
            timings = dict(timings or {})
            timings.setdefault("total_s", sum(timings.values()) if timings else
                               time.perf_counter() - self.started)
            report.update(
                method=self.method, report_format=REPORT_FORMAT,
                target_macs=None if self.target_ratio is None else dict(
                    ratio=self.target_ratio, macs=round(self.target_ratio * self.teacher_macs)),
                teacher_macs=self.teacher_macs, achieved_macs=achieved,
                achieved_ratio=achieved / self.teacher_macs, structure=block_structure(student.spec),
                finetune_iters=dict(dict(student=0, per_step=0, steps=0, selection=0),
                                    **(finetune_iters or {})),
                timings=timings, settings=self.settings,
                num_images=0 if self.images is None else int(self.images.shape[0]),
                device=str(self.device), resumed=self.resumed, extras=extras or {})
        return student


# format-1 keys that were common in spirit but named per method
_OLD_TARGET_RATIO = ("target_ratio",)
_OLD_ACHIEVED_RATIO = ("kept_ratio",)


def upgrade_report(report: dict) -> dict:
    """A report as REPORT_FORMAT describes it: format-2 reports are returned as they are; a
    format-1 report (saved before the common schema) gets the common keys it can be given
    (target_macs, achieved_ratio, finetune_iters, timings, extras) and its other keys under
    extras. The saved file is never changed."""
    if report.get("report_format") == REPORT_FORMAT:
        return report
    old = dict(report)
    teacher, achieved = old.get("teacher_macs"), old.get("achieved_macs")
    target = old.get("target_macs")
    if not isinstance(target, dict):
        ratio = next((old[k] for k in _OLD_TARGET_RATIO if old.get(k) is not None), None)
        target = None if ratio is None or teacher is None else dict(ratio=ratio, macs=round(ratio * teacher))
    achieved_ratio = old.get("achieved_ratio", next((old[k] for k in _OLD_ACHIEVED_RATIO if k in old), None))
    if achieved_ratio is None and teacher and achieved is not None:
        achieved_ratio = achieved / teacher
    common = dict(method=old.get("method"), report_format=REPORT_FORMAT, target_macs=target,
                  teacher_macs=teacher, achieved_macs=achieved, achieved_ratio=achieved_ratio,
                  structure=None, finetune_iters=old.get("finetune_iters") or {},
                  timings=old.get("timings") or {}, settings=old.get("settings") or {},
                  num_images=old.get("num_images"), device=old.get("device"),
                  resumed=old.get("resumed", False))
    moved = _OLD_TARGET_RATIO + _OLD_ACHIEVED_RATIO
    common.update({k: old[k] for k in CLI_KEYS if k in old})
    common["extras"] = {k: v for k, v in old.items() if k not in common and k not in moved}
    return common
