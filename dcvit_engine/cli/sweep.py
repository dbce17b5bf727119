"""`dcvit sweep`: compress one model to a dense family of MACs targets with one or more
methods; print a table and write sweep.csv and sweep.md (each row as soon as it is done),
then sweep.png (accuracy against MACs and against measured latency). An interrupted sweep
continues with --resume (dcvit_engine.sweep_state); an existing --out needs --overwrite."""
from pathlib import Path

from dcvit_engine.cli import CommandError
from dcvit_engine.cli.data_args import add_data_arguments, images_from_args, preprocess_from_args
from dcvit_engine.cli.method_args import add_method_options
from dcvit_engine.cli.model_args import add_model_arguments, backend_errors_as_command_errors, model_from_args
from dcvit_engine.cli.option_types import nonnegative_int, positive_int
from dcvit_engine.errors import InputError

# the options that set what a method's run costs (selection, search, finetuning)
COST_OPTIONS = ("iters", "select_iters", "adaptor_iters", "finetune_iters", "batch_size")


def register(subparsers):
    parser = subparsers.add_parser("sweep", help="compress to a family of MACs targets and compare methods")
    add_model_arguments(parser)
    add_data_arguments(parser, num_samples_required=True)  # the few-shot images (labels unused)
    parser.add_argument("--eval-data", required=True,
                        help="folder of evaluation images; with class subfolders top-1 is reported")
    parser.add_argument("--methods", default="dcvit,practise",
                        help="comma-separated (default dcvit,practise)")
    parser.add_argument("--targets", default="0.9,0.8,0.7,0.6,0.5",
                        help="comma-separated fractions of MACs kept (default 0.9,...,0.5)")
    # every cost knob `dcvit compress` has, and the settings of a few-shot finetune; default: each
    # method's own (a knob reaches the methods that take it, see --help of compress)
    add_method_options(parser, names=COST_OPTIONS + ("lr", "augment", "rounding"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default=None, help="engine backend for evaluation and latency")
    parser.add_argument("--metric-size", type=positive_int, default=50,
                        help="synthetic metric-set images per seed, shared by DC-ViT and PRACTISE "
                        "(default 50)")
    parser.add_argument("--metric-iters", type=nonnegative_int, default=2000,
                        help="metric-set optimization steps (default 2000, the official value)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    add_fairness_arguments(parser, default_seeds=1)
    parser.add_argument("--out", required=True,
                        help="output folder: sweep.csv and sweep.md (rewritten as each row finishes), "
                        "sweep.png, sweep_state.json, metric_sets/")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted sweep in --out: finished rows are kept, not run "
                        "again (refused when its settings differ)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the sweep already in --out (without it, an existing --out is refused)")
    parser.set_defaults(func=run)


def add_fairness_arguments(parser, default_seeds: int) -> None:
    """--seeds, --budget, --no-pair: shared by `dcvit sweep` and `dcvit demo`."""
    parser.add_argument("--seeds", type=int, default=default_seeds,
                        help="few-shot draws (image subset, metric set, method seed): seeds --seed .. "
                        f"--seed + K - 1; tables show mean ± std (default {default_seeds})")
    parser.add_argument("--budget", choices=("equal", "official"), default="equal",
                        help="equal (default): every DC-ViT/PRACTISE student gets --iters finetuning "
                        "iterations in total (DC-ViT splits them over its steps); official: DC-ViT "
                        "finetunes --iters per progressive step, as its code does")
    parser.add_argument("--no-pair", dest="pair", action="store_false",
                        help="do not also run DC-ViT at each PRACTISE MACs point (one block more)")
    parser.add_argument("--recipe", choices=("shared", "official"), default="shared",
                        help="PRACTISE's finetuning: shared (default; DC-ViT's recipe, so the methods "
                        "differ only in what they remove) or official (its adaptors and SGD; "
                        "rows 'practise-official')")


def check_seeds(seeds: int) -> int:
    if seeds < 1:
        raise CommandError(f"--seeds must be at least 1 (the number of few-shot draws), got {seeds}")
    return seeds


def parse_methods_targets_seeds(args) -> tuple[list[str], list[float], range]:
    """--methods (registered names), --targets and --seeds of `dcvit sweep` and `dcvit demo`."""
    from dcvit_engine.compress.api import METHODS

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise CommandError(f"--methods names no method, got {args.methods!r}; choose from "
                           f"{', '.join(METHODS)}")
    repeated = sorted({m for m in methods if methods.count(m) > 1})
    if repeated:
        raise CommandError(f"--methods names {', '.join(repeated)} more than once")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise CommandError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return methods, parse_targets(args.targets), range(args.seed, args.seed + check_seeds(args.seeds))


def parse_targets(text: str) -> list[float]:
    try:
        targets = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise CommandError("--targets must be comma-separated numbers such as 0.9,0.7,0.5, "
                           f"got {text!r}") from None
    if not targets or not all(0 < t < 1 for t in targets):
        raise CommandError(f"--targets must be fractions of MACs kept, each in (0, 1), got {text!r}")
    repeated = sorted({t for t in targets if targets.count(t) > 1})
    if repeated:  # a repeated target would be reported as a second seed
        raise CommandError(f"--targets names {', '.join(map(str, repeated))} more than once, got {text!r}")
    return targets


# options that do not change a sweep's rows (how it is run and where it writes)
NOT_SETTINGS = ("out", "resume", "overwrite", "func", "command", "argv", "on_interrupt")


def sweep_settings(args) -> dict:
    """Every option that decides the rows (a resume must repeat them): the parsed arguments
    but the output folder and the resume/overwrite flags."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in NOT_SETTINGS and not callable(v)}


def run(args):
    from dcvit_engine import sweep
    from dcvit_engine.atomic import removed_if_left_empty
    from dcvit_engine.cli import resume_command
    from dcvit_engine.compress.api import method_options
    from dcvit_engine.sweep_state import METRIC_SETS, PLOT_FILENAME, SweepState

    if args.resume and args.overwrite:
        raise CommandError("give --resume (continue the sweep in --out) or --overwrite (replace it), "
                           "not both")
    methods, targets, seeds = parse_methods_targets_seeds(args)
    methods_options = method_options_from_args(args, methods)
    teacher, name = model_from_args(args)
    pairs = {}
    if args.pair and "dcvit" in methods and "practise" in methods:
        try:
            pairs = sweep.equal_macs_pairs(teacher.spec, targets, methods_options["practise"])
        except InputError as err:
            raise CommandError(str(err)) from None
    config = preprocess_from_args(args, teacher)
    run_progress = _announce_plan(args, teacher.spec, methods_options, targets, len(seeds))
    draws = [sweep.Draw(seed, images_from_args(args, config, seed=seed)[0]) for seed in seeds]
    images = draws[0].images
    eval_images, eval_labels, _ = images_from_args(args, config, data=args.eval_data)
    out = Path(args.out)
    # a sweep that fails before its first row leaves no empty folder; every phase's bar counts into
    # the overall line (progress.py)
    with removed_if_left_empty(out), run_progress:
        state = SweepState(out, sweep_settings(args), resume=args.resume, overwrite=args.overwrite)
        metric_sets = any("metric_set" in method_options(m) for m in methods)
        args.on_interrupt = lambda: f"kept {state.kept()}; resume with: {resume_command(args)}"
        if state.resumed:
            print(f"resuming the sweep in {out}: {len(state.rows)} row(s) done, not run again")
        elif args.resume:
            print(f"--resume: no sweep in {out}, so this one starts from scratch")
        print(f"sweep of {name}: {len(images)} few-shot images x {len(draws)} seeds, {len(eval_images)} "
              f"evaluation images, methods {', '.join(methods)}, "
              f"targets {', '.join(f'{t:.2f}' for t in targets)}, "
              f"{args.budget} finetuning budget")
        print("selection cost per seed (finetuning iterations):")
        for method in methods:
            cost = sweep.selection_cost(method, methods_options[method], teacher.spec, targets, args.budget)
            print("  " + cost)
        for ratio, blocks in pairs.values():
            line = sweep.selection_cost(sweep.PAIRED, dict(methods_options["dcvit"], num_blocks=blocks),
                                        teacher.spec, [ratio], args.budget)
            print(f"  {sweep.PAIRED} at {ratio:.3f}" + line[len(sweep.PAIRED):])
        if metric_sets:
            print(f"  + one metric set per seed: {args.metric_size} images x {args.metric_iters} "
                  "DeepInversion steps (shared by the methods that score on it)")
        if metric_sets:
            from dcvit_engine.compress.metric_set import synthesize_metric_set

            (out / METRIC_SETS).mkdir(exist_ok=True)
            for draw in draws:  # one metric set per draw, the same for both methods (scored alike)
                draw.options["metric_set"] = synthesize_metric_set(
                    teacher, num_images=args.metric_size, iters=args.metric_iters, seed=draw.seed,
                    mean=config.mean, std=config.std, device=args.device, cache_path=out / METRIC_SETS,
                    progress=True).images
        print(" | ".join(sweep.ROW_COLUMNS))
        for row in state.rows:
            print(" | ".join(sweep.table_line(row)) + "  (before the resume)")

        def finished(row):
            state.add(row)
            print(" | ".join(sweep.table_line(row)), flush=True)

        with backend_errors_as_command_errors():
            sweep.run_sweep(teacher, None, eval_images, eval_labels, methods_options, targets, draws=draws,
                            budget=args.budget, pair=args.pair, device=args.device, backend=args.backend,
                            progress=True, on_row=finished, done=state.done)
    rows = state.rows
    if len(rows) == 1:
        raise CommandError("no method reached any of the targets; see the reasons above")
    print("\n" + sweep.format_table(rows))
    png_path = sweep.plot_sweep(rows, out / PLOT_FILENAME, title=name)
    print(f"\nwrote {state.csv_path}, {state.table_path} and {png_path}")
    return 0


def method_options_from_args(args, methods) -> dict[str, dict]:
    """method -> the options the sweep passes it: each given knob to the methods that take
    it; a knob no method of --methods takes is a one-line error naming it."""
    from dcvit_engine.compress.api import method_options

    knobs = COST_OPTIONS + ("lr", "augment", "rounding")
    given = {name: getattr(args, name) for name in knobs if getattr(args, name) is not None}
    unused = [name for name in given if not any(name in method_options(m) for m in methods)]
    if unused:
        flags = ", ".join("--" + name.replace("_", "-") for name in unused)
        raise CommandError(f"{flags} appl(ies) to none of --methods {','.join(methods)}")
    options = dict(given, device=args.device)
    if args.recipe != "shared":
        options["recipe"] = args.recipe
    return {m: _options_for(m, options) for m in methods}


def _options_for(method: str, options: dict) -> dict:
    """The shared options that `method` takes (e.g. ToMe has no finetuning iterations);
    options not given (None) are left out, so the method's own defaults apply."""
    from dcvit_engine.compress.api import method_options

    accepted = method_options(method)
    return {k: v for k, v in options.items() if k in accepted and v is not None}


    return {k: v for k, v in options.items() if k in accepted and v is not None}


def _announce_plan(args, spec, methods_options: dict, targets, seeds: int):
    """Prints the sweep's plan (steps per draw, method and target) and the options that fit a
    CPU when GPU-sized settings run on one; returns the RunProgress to count the bars into."""
    from dcvit_engine.compress.api import method_options
    from dcvit_engine.compress.phases import sweep_phases
    from dcvit_engine.presets import gpu_sized_note
    from dcvit_engine.progress import RunProgress

    uses_metric_set = any("metric_set" in method_options(m) for m in methods_options)
    run_progress = RunProgress(sweep_phases(spec, methods_options, targets, seeds,
                                            args.metric_iters if uses_metric_set else None, args.budget))
    print(f"{run_progress.describe_plan()}; time: {run_progress.estimate_text()}, refined as it runs")
    note = gpu_sized_note(args.device, run_progress.total_steps, None,
                          fix="lower --iters and --metric-iters (e.g. 100), or sweep fewer --targets")
    if note:
        print(note)
    return run_progress
