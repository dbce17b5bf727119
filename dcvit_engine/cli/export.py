"""`dcvit export`: write an artifact as an ONNX file (onnxruntime) or a torch.export program
(.pt2, `torch.export.load`), token merges included. The exported model is run next to the
reference module on random images before it is written; above the dtype's tolerance the
command fails and writes nothing."""
import json

from dcvit_engine.artifact import load
from dcvit_engine.cli import CommandError
from dcvit_engine.cli.option_types import positive_int
from dcvit_engine.errors import InputError
from dcvit_engine.export import DEFAULT_OPSET, DTYPES, FORMATS, OUTPUTS, check_options, export_model


def register(subparsers):
    parser = subparsers.add_parser("export", description=__doc__,
                                   help="export an artifact to ONNX or torch.export (.pt2), verified")
    parser.add_argument("artifact", metavar="ARTIFACT",
                        help="artifact folder (spec.json + model.safetensors)")
    parser.add_argument("--format", required=True, help=f"{' | '.join(FORMATS)}")
    parser.add_argument("--out", required=True, metavar="FILE", help="the file to write (e.g. model.onnx)")
    # not an argparse exclusive group: its error takes two lines (usage + message)
    parser.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                       help="fixed batch size of the exported model (default 1)")
    parser.add_argument("--dynamic-batch", action="store_true", help="any batch size")
    parser.add_argument("--dtype", default="fp32", help=f"{' | '.join(DTYPES)} (default fp32); "
                        "the exported model takes images of this dtype")
    parser.add_argument("--opset", type=positive_int, default=None, metavar="K",
                        help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--output", default="logits", help=f"{' | '.join(OUTPUTS)} (default logits); "
                        "full-features: the final tokens with every ATME merge undone, on the input "
                        "grid (CAIT's dense-prediction output)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args):
    # options first: a refused combination costs no model load
    check_options(args.format, args.dtype, args.batch_size, args.dynamic_batch, args.opset, args.output)
    try:
        model = load(args.artifact)
    except (OSError, InputError) as err:
        raise CommandError(f"cannot load artifact {args.artifact}: {err}") from None
    result = export_model(model, args.out, format=args.format, dtype=args.dtype,
                          batch_size=args.batch_size, dynamic_batch=args.dynamic_batch,
                          opset=args.opset, output=args.output)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    batch = "dynamic batch" if result.batch is None else f"batch {result.batch}"
    what = "logit" if result.output == "logits" else "feature"
    print(f"verified on batch(es) {', '.join(map(str, result.checked_batches))} of random images: "
          f"max abs {what} diff {result.max_abs_diff:.3g}, relative {result.max_rel_diff:.3g} "
          f"(tolerance {result.tolerance:g})")
    print(f"wrote {result.path} ({result.format}, {result.output}, {result.dtype}, {batch}) in "
          f"{result.export_s:.1f} s")
    return 0
