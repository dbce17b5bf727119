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

The report's schema is compress/report.py's; the options a method offers `dcvit compress`
are compress/options.py's CliOption.
"""
from __future__ import annotations

import json
import time
from typing import Callable

import torch

from ..data import nonfinite_rows, refuse_nonfinite
from ..devices import resolve_device
from ..macs import count_macs
from ..reference import ViTReference
from .fewshot import ProgressLog, as_reference, check_images, on_device
from .finetune import kd_finetune
from .options import CliOption, block_list  # noqa: F401  (the method modules' import of them)
from .report import REPORT_FORMAT, block_structure
from .run_state import RunCheckpoint, model_digest, tensor_digest
from .structure import check_target_ratio


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
    still checked). settings: the run's options, for the report (a method with checkpoints
    gives them to `checkpoint` instead; `finish(settings=...)` takes those known only later).
    head_required: the method compares class distributions, so the teacher
    needs its classifier. move: False keeps the teacher where it is (a method that computes
    nothing on it), else it is copied to the chosen device.
    """

    def __init__(self, method: str, model, images, target_macs, *, device=None, progress: bool = False,
                 target_required: bool = True, images_required: bool = True, head_required: bool = True,
                 move: bool = True, settings: dict | None = None):
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
        self.settings: dict = dict(settings or {})
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
               timings: dict | None = None, extras: dict | None = None,
               settings: dict | None = None) -> ViTReference:
        """The student in eval mode; `report` (when given) receives the common report, with
        `settings` added to the run's."""
        student.eval()
        self.settings.update(settings or {})
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
