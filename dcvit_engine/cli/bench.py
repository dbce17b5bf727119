"""`dcvit bench`: images/s and latency of the engine on an artifact or a timm model (random
weights), median of repeats after warm-up (compilation and CUDA graph capture happen in
the warm-up).

Before and after: with --teacher NAME (the timm model the student was compressed from)
timm's own eager forward and the engine are timed on the teacher beside the engine on the
student, interleaved in one run (each round calls every runner once, so all of them see the
same load), and the speedup is printed with the realized speedup = speedup / MACs
reduction. With --onnx FILE (an export of the same model, CPU only) onnxruntime joins the
same interleaved run on the same images. With --peers (CPU) the model is exported to a
temporary folder and onnxruntime and OpenVINO run that export in the same interleaved run
(dcvit_engine.peers); a peer that is not installed or cannot load it is a line with the
reason."""
import json
import tempfile

import torch

from dcvit_engine.artifact import load_report
from dcvit_engine.cli import CommandError
from dcvit_engine.cli.model_args import add_model_arguments, backend_errors_as_command_errors, model_from_args
from dcvit_engine.cli.option_types import nonnegative_int, positive_int
from dcvit_engine.devices import resolve_device
from dcvit_engine.dtypes import command_dtype
from dcvit_engine.engine import build_engine
from dcvit_engine.macs import count_macs
from dcvit_engine.models import create_timm_model, parse_model_kwargs
from dcvit_engine.ops import BACKENDS
from dcvit_engine.throughput import measure_throughput, time_interleaved

TIMM_TEACHER, ENGINE_TEACHER, ENGINE = "timm eager (teacher)", "engine (teacher)", "engine"


def register(subparsers):
    parser = subparsers.add_parser("bench", help="measure the engine's images/s and latency",
                                   description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--dtype", default=None,
                        help="float32 | bf16 | fp16 (default: the --onnx file's dtype; else bf16 on CUDA "
                             "and on CPUs with native bf16 (AVX512-BF16/AMX), else float32)")
    parser.add_argument("--backend", default="auto", choices=("auto",) + BACKENDS)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--compile", action="store_true", help="run the engine through torch.compile")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="do not capture CUDA graphs")
    parser.add_argument("--warmup", type=nonnegative_int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--teacher", default=None, metavar="NAME",
                        help="timm model the student was compressed from: time timm eager and the engine on "
                             "it beside the engine on the student, interleaved, and print the speedup and "
                             "the realized speedup (random weights: speed does not depend on them)")
    parser.add_argument("--teacher-kwargs", default=None, metavar="JSON",
                        help="timm create_model keyword arguments of --teacher")
    parser.add_argument("--onnx", default=None, metavar="FILE",
                        help="also time this ONNX export of the model in onnxruntime (CPU), interleaved")
    parser.add_argument("--peers", action="store_true",
                        help="also time onnxruntime and OpenVINO (the `peers` extra) on the model's ONNX "
                             "export (CPU only; written to a temporary folder first), interleaved; "
                             "a peer that cannot run is listed with the reason")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


ONNX_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16,
              "tensor(bfloat16)": torch.bfloat16}


def open_onnx(path, device):
    """The onnxruntime session for --onnx (CPU, as many threads as torch uses)."""
    from dcvit_engine.export import onnx_session
    if device.type != "cpu":
        raise CommandError("--onnx runs onnxruntime on the CPU; add --device cpu")
    try:
        return onnx_session(path, threads=torch.get_num_threads())
    except ValueError:
        raise
    except Exception as err:  # onnxruntime's own error types for unreadable files
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise CommandError(f"cannot load {path} in onnxruntime: {first.strip()}") from None


def onnx_runner(session, path, images):
    """A callable timing the session on `images`, after checking that the file takes images
    of this shape and dtype."""
    (inp,) = session.get_inputs()
    dtype = ONNX_TYPES.get(inp.type)
    if dtype != images.dtype:
        raise CommandError(f"{path} takes {inp.type} images but the engine runs "
                           f"{str(images.dtype).removeprefix('torch.')}; pass the matching --dtype")
    wanted = list(images.shape)
    if len(inp.shape) != len(wanted) or any(isinstance(d, int) and d != w for d, w in zip(inp.shape, wanted)):
        raise CommandError(f"{path} takes images of shape {inp.shape}, the benchmark's are {wanted}; "
                           "export with --dynamic-batch or pass the file's --batch-size")
    array = images.numpy()
    return lambda _: session.run(None, {inp.name: array})


def teacher_runners(args, spec, dtype, device) -> tuple[dict, dict, str | None]:
    """timm eager and the engine on --teacher (runners and GMACs per image), and a note when
    the student's own report names a teacher of other MACs."""
    teacher = create_timm_model(args.teacher, parse_model_kwargs(args.teacher_kwargs))
    engine = build_engine(teacher, backend=args.backend, dtype=dtype, device=device,
                          cuda_graphs=not args.no_cuda_graphs, compile=args.compile)
    if (engine.spec.in_chans, tuple(engine.spec.img_size)) != (spec.in_chans, tuple(spec.img_size)):
        raise CommandError(f"--teacher {args.teacher} takes {engine.spec.in_chans}x"
                           f"{'x'.join(map(str, engine.spec.img_size))} images, the student "
                           f"{spec.in_chans}x{'x'.join(map(str, spec.img_size))}: pass the teacher's "
                           "--teacher-kwargs (e.g. img_size)")
    macs = count_macs(engine.spec).total
    report = load_report(args.artifact) if args.artifact else None
    note = None
    if report and report.get("teacher_macs") and abs(report["teacher_macs"] - macs) > 1e-6 * macs:
        note = (f"note: the student's report gives its teacher {report['teacher_macs'] / 1e9:.4f} "
                f"GMACs/image, --teacher {args.teacher} has {macs / 1e9:.4f}: the comparison is not with "
                "its own teacher")
    teacher = teacher.to(device=device, dtype=dtype)
    return {TIMM_TEACHER: teacher, ENGINE_TEACHER: engine}, {TIMM_TEACHER: macs, ENGINE_TEACHER: macs}, note


def add_peers(runners, macs, model, folder, dtype, have_onnx: bool) -> dict[str, str]:
    """onnxruntime and OpenVINO on the model's export into `folder` join `runners` under
    their own names (the --onnx file's onnxruntime stays as it is); returns the reasons of
    those that cannot run."""
    from dcvit_engine.peers import Unavailable, export_when_needed, open_peers, runtime_versions

    versions = runtime_versions()
    unavailable = {}
    export = export_when_needed(model, folder)
    for peer, runner in open_peers(*export, dtype, torch.get_num_threads()).items():
        name = f"{peer} {versions[peer]}".split("-")[0]
        if isinstance(runner, Unavailable):
            unavailable[peer] = runner.reason
        elif not (peer == "onnxruntime" and have_onnx):
            runners[name], macs[name] = runner, macs[ENGINE]
    return unavailable


def run(args):
    if args.teacher_kwargs and not args.teacher:
        raise CommandError("--teacher-kwargs needs --teacher NAME")
    device = resolve_device(args.device)
    if args.peers and device.type != "cpu":
        raise CommandError("--peers runs onnxruntime and OpenVINO on the CPU; add --device cpu")
    session = open_onnx(args.onnx, device) if args.onnx else None
    if session is not None and args.dtype is None:
        # Compare like with like: without --dtype the engine runs in the file's dtype.
        dtype, note = ONNX_TYPES.get(session.get_inputs()[0].type, torch.float32), None
    else:
        dtype, note = command_dtype(args.dtype, device)
    notes = [note] if note else []
    model, name = model_from_args(args)
    engine = build_engine(model, backend=args.backend, dtype=dtype, device=device,
                          cuda_graphs=not args.no_cuda_graphs, compile=args.compile)
    spec = engine.spec
    runners, macs = {}, {}
    if args.teacher:
        runners, macs, teacher_note = teacher_runners(args, spec, dtype, device)
        notes += [teacher_note] if teacher_note else []
    runners[ENGINE] = engine
    macs[ENGINE] = count_macs(spec).total
    images = torch.randn(args.batch_size, spec.in_chans, *spec.img_size, device=device, dtype=dtype)
    if session is not None:
        runners["onnxruntime"] = onnx_runner(session, args.onnx, images)
        macs["onnxruntime"] = macs[ENGINE]
    with tempfile.TemporaryDirectory(prefix="dcvit-bench-peers-") as folder:
        unavailable = {}
        if args.peers:
            unavailable = add_peers(runners, macs, model, folder, dtype, "onnxruntime" in runners)
        notes += [f"{peer}: unavailable: {why}" for peer, why in unavailable.items()]
        with backend_errors_as_command_errors():
            if len(runners) == 1:
                timings = {ENGINE: measure_throughput(engine, images, warmup=args.warmup,
                                                      repeats=args.repeats)}
            else:
                timings = time_interleaved(runners, images, warmup=args.warmup, repeats=args.repeats)
    result = _result(args, name, device, dtype, engine, macs, timings, notes)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(args, name, device, result, timings, macs, notes)
    return 0


def _result(args, name, device, dtype, engine, macs, timings, notes) -> dict:
    """The JSON object: the engine's timing at the top level (as without comparisons), every
    runner under `runners`, and the before/after ratios when a teacher was timed."""
    result = dict(model=name, device=str(device), dtype=str(dtype).removeprefix("torch."),
                  backend=args.backend, compile=args.compile, cuda_graphs=engine.cuda_graphs,
                  gmacs_per_image=macs[ENGINE] / 1e9, **timings[ENGINE].to_dict())
    if notes:
        result["notes"] = notes
    if len(timings) > 1:
        result["runners"] = {k: dict(gmacs_per_image=macs[k] / 1e9, **t.to_dict())
                             for k, t in timings.items()}
    if "onnxruntime" in timings:
        result["onnxruntime"] = dict(file=args.onnx, threads=torch.get_num_threads(),
                                     **timings["onnxruntime"].to_dict())
    if ENGINE_TEACHER in timings:
        speedup = timings[ENGINE].images_per_s / timings[ENGINE_TEACHER].images_per_s
        reduction = macs[ENGINE_TEACHER] / macs[ENGINE]
        result.update(teacher=args.teacher,
                      speedup_vs_timm_eager=timings[ENGINE].images_per_s / timings[TIMM_TEACHER].images_per_s,
                      speedup_vs_teacher_engine=speedup, macs_reduction=reduction,
                      realized_speedup=speedup / reduction)
    return result


def _print(args, name, device, result, timings, macs, notes) -> None:
    for line in notes:
        print(line)
    print(f"{name} on {device} ({result['dtype']}, backend {args.backend}"
          f"{', compiled' if args.compile else ''}{', CUDA graphs' if result['cuda_graphs'] else ''}), "
          f"{macs[ENGINE] / 1e9:.3f} GMACs/image")
    if len(timings) == 1:
        timing = timings[ENGINE]
        print(f"batch {args.batch_size}: {timing.images_per_s:.1f} images/s, latency median "
              f"{timing.median_ms:.3f} ms (min {timing.min_ms:.3f}, max {timing.max_ms:.3f}) over "
              f"{timing.repeats} repeats after {args.warmup} warm-up")
        return
    base = TIMM_TEACHER if TIMM_TEACHER in timings else ENGINE
    threads = f" ({torch.get_num_threads()} CPU thread(s))" if device.type == "cpu" else ""
    print(f"batch {args.batch_size}, {args.repeats} interleaved rounds after {args.warmup} warm-up{threads}:")
    rows = [("runner", "GMACs/image", "images/s", "median ms", f"vs {base}")]
    label = {ENGINE: "engine (student)"} if ENGINE_TEACHER in timings else {}
    rows += [(label.get(k, k), f"{macs[k] / 1e9:.3f}", f"{t.images_per_s:.1f}", f"{t.median_ms:.3f}",
              f"{t.images_per_s / timings[base].images_per_s:.2f}x") for k, t in timings.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + r[0].ljust(widths[0]) + "  " + "  ".join(v.rjust(w) for v, w in zip(r[1:], widths[1:])))
    if ENGINE_TEACHER in timings:
        print(f"student vs teacher on the engine: {result['speedup_vs_teacher_engine']:.2f}x the images/s "
              f"for {result['macs_reduction']:.2f}x fewer MACs: realized speedup "
              f"{result['realized_speedup']:.2f} (1.00 = every MAC removed came back as speed)")
