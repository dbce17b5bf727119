"""The one report every compression method writes (MethodRun.finish fills it), and the
reading of reports saved before it.

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

REPORT_FORMAT = 2
COMMON_KEYS = ("method", "report_format", "target_macs", "teacher_macs", "achieved_macs", "achieved_ratio",
               "structure", "finetune_iters", "timings", "settings", "num_images", "device", "resumed",
               "extras")
CLI_KEYS = ("model", "data", "num_samples", "load_s", "wall_s")  # what `dcvit compress` adds


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
