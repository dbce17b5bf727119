"""`dcvit info`: per-block structure (heads kept, q/k and v widths, MLP hidden, merge),
MACs and parameters of an artifact or a timm model, and the preprocessing its images get
(the artifact's preprocess.json, or timm's resolve_data_config), as a table or JSON."""
import json

from dcvit_engine.cli.model_args import add_model_arguments, preprocess_from_source, spec_from_args
from dcvit_engine.summary import format_summary, model_summary


def register(subparsers):
    parser = subparsers.add_parser("info", help="show a model's per-block structure, MACs and parameters",
                                   description=__doc__)
    add_model_arguments(parser, weights=False)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


CAIT_NOTE = ("CAIT (ATME token merging + CDCP channel pruning) is this project's own definition: the "
             "paper's method section and code are not public (see dcvit_engine/compress/cait.py)")


def run(args):
    spec, name = spec_from_args(args)
    summary = model_summary(spec)
    preprocess = preprocess_from_source(args)
    cait = any(b.merge is not None and b.merge.kind == "atme" for b in spec.blocks)
    if args.json:
        print(json.dumps(dict(summary, model=name, preprocess=preprocess.to_dict(),
                              **({"note": CAIT_NOTE} if cait else {})), indent=2))
    else:
        print(format_summary(summary, name))
        print(f"preprocessing: {preprocess.describe()}")
        if cait:
            print(f"note: {CAIT_NOTE}")
    return 0
