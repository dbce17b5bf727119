"""`dcvit compress`: compress a timm ViT/DeiT (or an artifact) with a few images.

  dcvit compress --model deit_base_patch16_224 --checkpoint deit_b.pth --data few/ \\
      --num-samples 50 --method dcvit --target-macs 0.75 --out deit_b_075

Writes an artifact folder (spec.json, model.safetensors, report.json) that
dcvit_engine.load reads. While it runs, OUT.partial holds a checkpoint after every
step; after an interruption, the same command with --resume continues from it.
"""
import argparse
import shutil
import time
from pathlib import Path

from dcvit_engine.artifact import save
from dcvit_engine.checkpoints import load_checkpoint
from dcvit_engine.cli import CommandError, resume_command
from dcvit_engine.cli.data_args import add_data_arguments, images_from_args, preprocess_from_args
from dcvit_engine.cli.method_args import add_method_argument, add_method_options, given_options
from dcvit_engine.cli.model_args import add_model_arguments
from dcvit_engine.cli.plan import add_target_argument
from dcvit_engine.compress.api import METHODS, compress, method_options
from dcvit_engine.compress.phases import planned_phases
from dcvit_engine.compress.run_state import STATE_FILENAME
from dcvit_engine.macs import count_macs
from dcvit_engine.models import describe_source, parse_model_kwargs, resolve_model
from dcvit_engine.presets import PRESETS, describe_preset, gpu_sized_note, preset_options
from dcvit_engine.progress import RunProgress
from dcvit_engine.runlock import exclusive_folder
from dcvit_engine.spec import SPEC_FILENAME


def register(subparsers):
    parser = subparsers.add_parser("compress", help="compress a model with a few images "
                                   f"({', '.join(METHODS)})",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, weights=True)
    # --data and --num-samples: required by the methods that use images (METHODS' uses_images)
    add_data_arguments(parser, num_samples_required=False, data_required=False)
    add_method_argument(parser)
    add_target_argument(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="artifact folder to write")
    # every method's own options, from its module's CLI_OPTIONS; only those given are passed
    parser.set_defaults(method_option_names=add_method_options(parser))
    parser.add_argument("--seed", type=int, default=0, help="picks the images and seeds every random choice")
    parser.add_argument("--device", default=None,
                        help="cpu or cuda (default: the method's, cuda when available)")
    parser.add_argument("--preset", choices=tuple(PRESETS), default=None,
                        help="quick: sized for a laptop CPU (minutes): sets "
                        f"{describe_preset('quick')} (each method takes those it has; options given "
                        "win). Without it the methods' own defaults apply, the papers' (GPU-sized)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run whose checkpoint is in OUT.partial")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the artifact already in OUT (without it, or --resume, that is refused)")
    parser.set_defaults(func=run)


def model_from_source(artifact, model_name, model_kwargs_text, checkpoint, pretrained=False):
    """(ViTReference, printable name) of an artifact or a timm model; a timm `checkpoint`
    file is loaded with dcvit_engine.checkpoints (one-line errors naming the tensors)."""
    source = dict(artifact=artifact, model_name=model_name,
                  model_kwargs=parse_model_kwargs(model_kwargs_text) or None)
    if checkpoint is not None and artifact is not None:
        raise CommandError("--checkpoint applies to a timm --model; an artifact carries its own weights")
    if checkpoint is not None and pretrained:
        raise CommandError("give either --checkpoint or --pretrained, not both")
    model = resolve_model(**source, pretrained=pretrained)
    name = describe_source(**source)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, what=name)
    return model, name


def _method_options(args) -> dict:
    """Only what the user gave reaches the method: its own signature holds its defaults."""
    options = given_options(args, args.method, args.method_option_names)
    accepted = method_options(args.method)
    options.update({name: getattr(args, name) for name in ("device", "seed")
                    if name in accepted and getattr(args, name) is not None})
    if args.resume and "resume" not in accepted:
        raise CommandError(f"--resume do(es) not apply to --method {args.method}")
    return options


def _check_paths(out: Path, partial: Path, resume: bool, overwrite: bool = False) -> None:
    """Fail before any work when OUT could not be written (only an earlier artifact is
    replaced, and only with --overwrite or --resume) or an interrupted run would be silently
    discarded."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / SPEC_FILENAME).is_file())):
        raise CommandError(f"--out {out} exists and is not an artifact folder; choose another path")
    if (out / SPEC_FILENAME).is_file() and not (overwrite or resume):
        raise CommandError(f"--out {out} holds an artifact already; add --overwrite to replace it")
    if (out / SPEC_FILENAME).is_file():
        print(f"{out} holds an artifact already: it is replaced when this run ends")
    if (partial / STATE_FILENAME).is_file() and not resume:
        raise CommandError(f"{partial} holds the checkpoint of an interrupted run; add --resume to "
                           "continue it, or remove that folder to start over")
    if resume and not (partial / STATE_FILENAME).is_file():
        print(f"--resume: no checkpoint in {partial}, so this run starts from scratch")


def run(args):
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    with exclusive_folder(partial):  # one writer per --out: a second one refuses, naming the first
        return _compress(args, out, partial)


def _check_data(args) -> None:
    """--data and --num-samples for a method that uses images; a training-free one needs neither."""
    if METHODS[args.method].uses_images:
        missing = [flag for flag, value in (("--data", args.data), ("--num-samples", args.num_samples))
                   if value is None]
        if missing:
            raise CommandError(f"--method {args.method} needs {' and '.join(missing)} (the few-shot images)")


def _compress(args, out: Path, partial: Path) -> int:
    _check_data(args)
    options = _method_options(args)  # a flag the method does not take is named first
    _check_paths(out, partial, args.resume, args.overwrite)
    options.update(preset_options(args.preset, method_options(args.method), options))
    started = time.perf_counter()
    model, name = model_from_source(args.artifact, args.model, args.model_kwargs, args.checkpoint,
                                    args.pretrained)
    config = preprocess_from_args(args, model)  # stored in the artifact: eval and infer reuse it
    images, labels = None, None
    if args.data is not None:  # a training-free method still checks images it is given
        images, labels, _classes = images_from_args(args, config, seed=args.seed)
    num_images = 0 if images is None else int(images.shape[0])
    accepted = method_options(args.method)
    if "checkpoint_dir" in accepted:  # methods with per-step checkpoints resume from OUT.partial
        options.update(checkpoint_dir=partial, resume=args.resume)
        args.on_interrupt = lambda: (f"kept the completed steps in {partial}; resume with: "
                                     f"{resume_command(args)}")
    if "labels" in accepted and labels is not None:
        options["labels"] = labels
    loaded_s = time.perf_counter() - started
    print(f"{name}: {num_images} images from {args.data}, {args.method} to "
          f"{args.target_macs} of the MACs")
    print(f"preprocessing: {config.describe()}")
    run_progress = _announce_plan(args, model, options)
    report = {}
    with run_progress:
        student = compress(model, images, method=args.method, target_macs=args.target_macs,
                           progress=True, report=report, **options)
    report.update(model=name, data=None if args.data is None else str(args.data), num_samples=num_images,
                  load_s=loaded_s, wall_s=time.perf_counter() - started)
    save(student, out, report=report, preprocess=config)
    shutil.rmtree(partial, ignore_errors=True)  # the run is complete: its checkpoints are spent
    macs, teacher_macs = count_macs(student.spec).total, count_macs(model.spec).total
    structure = report["structure"]  # the common report only: the CLI knows no method's extras
    print(f"{len(structure)} blocks, {sum(b['heads'] > 0 for b in structure)} with attention, "
          f"{sum(b['mlp_hidden'] > 0 for b in structure)} with an MLP, "
          f"{sum(b['merge'] is not None for b in structure)} merging tokens")
    print(f"MACs {macs / 1e9:.4f} G = {macs / teacher_macs:.4f} of the teacher's "
          f"{teacher_macs / 1e9:.4f} G (target {args.target_macs})")
    print(f"wrote {out} ({report['wall_s']:.1f} s)")
    return 0


def _announce_plan(args, model, options: dict) -> RunProgress:
    """Prints the plan (phases and steps), that no time estimate exists before a step was timed,
    and, on a CPU with settings sized for a GPU, the options that make the run fit."""
    import torch

    run_progress = RunProgress(planned_phases(args.method, model.spec, args.target_macs, options))
    print(f"{run_progress.describe_plan()}; time: {run_progress.estimate_text()}, refined as it runs")
    device = options.get("device") or args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    note = gpu_sized_note(str(device), run_progress.total_steps, args.preset)
    if note:
        print(note)
    return run_progress
