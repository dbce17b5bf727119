"""`dcvit infer`: predict every image of a folder with the engine and write a CSV (path,
predicted class, top-1 probability; label when the folder has class subfolders). Under
`torchrun --nproc_per_node N dcvit infer ...` the images are split across the processes
and rank 0 writes the CSV."""
from pathlib import Path

import torch

from dcvit_engine.cli.data_args import add_preprocess_arguments, preprocess_from_args
from dcvit_engine.cli.model_args import add_model_arguments, backend_errors_as_command_errors, model_from_args
from dcvit_engine.cli.option_types import nonnegative_int, positive_int
from dcvit_engine.devices import resolve_device
from dcvit_engine.dtypes import command_dtype
from dcvit_engine.infer import DECODE_CHOICES, run_inference
from dcvit_engine.ops import BACKENDS


def _class_names(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"class names file {file} not found (expected one name per line)")
    return [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def register(subparsers):
    parser = subparsers.add_parser("infer", description=__doc__,
                                   help="predict an image folder into a CSV "
                                        "(batched, multi-GPU with torchrun)")
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="image folder (flat, or one subfolder per class for labels)")
    parser.add_argument("--out", required=True, metavar="CSV", help="predictions CSV to write")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--backend", default="auto", choices=("auto",) + BACKENDS)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None,
                        help="float32 | bf16 | fp16 (default: bf16 on CUDA and on CPUs with native bf16 "
                             "(AVX512-BF16/AMX), else float32)")
    parser.add_argument("--num-workers", type=nonnegative_int, default=2, help="DataLoader worker processes")
    add_preprocess_arguments(parser)
    parser.add_argument("--decode", choices=DECODE_CHOICES, default="auto",
                        help="where JPEGs are decoded and preprocessed: device (batched nvJPEG on the GPU), "
                        "cpu (in the DataLoader workers); auto (default): device on CUDA, else cpu")
    parser.add_argument("--class-names", default=None, metavar="FILE",
                        help="text file with one class name per line, in the model's class order")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args):
    model, name = model_from_args(args)
    config = preprocess_from_args(args, model)
    device = torch.device(args.device) if args.device else None
    target = resolve_device(args.device)
    dtype, note = command_dtype(args.dtype, target)
    if note:
        print(note)
    with backend_errors_as_command_errors():
        result = run_inference(
            model, args.data, args.out, batch_size=args.batch_size, backend=args.backend,
            dtype=dtype, device=device,
            num_workers=args.num_workers, progress=not args.no_progress, preprocess=config,
            decode=args.decode, class_names=_class_names(args.class_names) if args.class_names else None)
    if result.out_path is None:  # a rank other than 0: rank 0 reports
        return 0
    processes = f" on {result.world_size} processes" if result.world_size > 1 else ""
    print(f"{name}: predicted {result.num_images} images in {result.seconds:.2f} s "
          f"({result.images_per_s:.1f} images/s{processes}); wrote {result.out_path}")
    print(f"preprocessing: {config.describe()}")
    print("columns: " + "; ".join(f"{name}: {meaning}" for name, meaning in result.columns.items()))
    if result.accuracy is not None:
        print(f"top-1 agreement with the folder's class indices: {result.accuracy:.2%}")
    return 0
