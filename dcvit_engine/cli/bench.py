"""`dcvit bench`: images/s and latency of the engine on an artifact or a timm model (random
weights), median of repeats after warm-up (compilation and CUDA graph capture happen in
the warm-up). With --onnx FILE (an export of the same model, CPU only) onnxruntime is
timed in the same run on the same images, so the two numbers can be compared."""
import json

import torch

from dcvit_engine.cli import CommandError
from dcvit_engine.cli.model_args import add_model_arguments, backend_errors_as_command_errors, model_from_args
from dcvit_engine.devices import resolve_device
from dcvit_engine.engine import build_engine, command_dtype
from dcvit_engine.macs import count_macs
from dcvit_engine.ops import BACKENDS
from dcvit_engine.throughput import measure_throughput


def register(subparsers):
    parser = subparsers.add_parser("bench", help="measure the engine's images/s and latency",
                                   description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", default=None,
                        help="float32 | bf16 | fp16 (default: the --onnx file's dtype; else bf16 on CUDA "
                             "and on CPUs with native bf16 (AVX512-BF16/AMX), else float32)")
    parser.add_argument("--backend", default="auto", choices=("auto",) + BACKENDS)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--compile", action="store_true", help="run the engine through torch.compile")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="do not capture CUDA graphs")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--onnx", default=None, metavar="FILE",
                        help="also time this ONNX export of the model in onnxruntime (CPU)")
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


def run(args):
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device)
    session = open_onnx(args.onnx, device) if args.onnx else None
    if session is not None and args.dtype is None:
        # Compare like with like: without --dtype the engine runs in the file's dtype.
        dtype, note = ONNX_TYPES.get(session.get_inputs()[0].type, torch.float32), None
    else:
        dtype, note = command_dtype(args.dtype, device)
    if note and not args.json:
        print(note)
    model, name = model_from_args(args)
    engine = build_engine(model, backend=args.backend, dtype=dtype, device=device,
                          cuda_graphs=not args.no_cuda_graphs, compile=args.compile)
    spec = engine.spec
    images = torch.randn(args.batch_size, spec.in_chans, *spec.img_size, device=device, dtype=dtype)
    run_onnx = onnx_runner(session, args.onnx, images) if session is not None else None
    with backend_errors_as_command_errors():
        timing = measure_throughput(engine, images, warmup=args.warmup, repeats=args.repeats)
    onnx_timing = (measure_throughput(run_onnx, images, warmup=args.warmup, repeats=args.repeats)
                   if run_onnx else None)
    macs = count_macs(spec).total
    result = dict(model=name, device=str(device), dtype=str(dtype).removeprefix("torch."),
                  backend=args.backend, compile=args.compile, cuda_graphs=engine.cuda_graphs,
                  gmacs_per_image=macs / 1e9, **timing.to_dict())
    if note:
        result["dtype_note"] = note
    if onnx_timing is not None:
        result["onnxruntime"] = dict(file=args.onnx, threads=torch.get_num_threads(), **onnx_timing.to_dict())
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{name} on {device} ({result['dtype']}, backend {args.backend}"
          f"{', compiled' if args.compile else ''}{', CUDA graphs' if engine.cuda_graphs else ''}), "
          f"{macs / 1e9:.3f} GMACs/image")
    print(f"batch {args.batch_size}: {timing.images_per_s:.1f} images/s, latency median "
          f"{timing.median_ms:.3f} ms (min {timing.min_ms:.3f}, max {timing.max_ms:.3f}) over "
          f"{timing.repeats} repeats after {args.warmup} warm-up")
    if onnx_timing is not None:
        print(f"onnxruntime ({args.onnx}, CPU, {torch.get_num_threads()} thread(s)), batch "
              f"{args.batch_size}: {onnx_timing.images_per_s:.1f} images/s, latency median "
              f"{onnx_timing.median_ms:.3f} ms (min {onnx_timing.min_ms:.3f}, max "
              f"{onnx_timing.max_ms:.3f}); engine/onnxruntime speed "
              f"{timing.images_per_s / onnx_timing.images_per_s:.3g}x")
    return 0
