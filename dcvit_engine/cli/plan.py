"""`dcvit plan`: the structure a MACs target gives, without data or training.

dcvit: how many blocks lose their attention and the MLP hidden width they keep.
practise: how many whole blocks are dropped (whole blocks only, so the MACs are discrete).
Which blocks are compressed is decided by `dcvit compress` from data; every candidate
block costs the same, so the MACs printed here are the compressed model's.
"""
import json

from dcvit_engine.cli.model_args import add_model_arguments, spec_from_args
from dcvit_engine.compress.structure import plan_block_drop, plan_dcvit


def parse_blocks(text: str | None) -> list[int] | None:
    """'1,2,5' -> [1, 2, 5] (the --candidates option of plan and compress)."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--candidates takes block indices separated by commas (e.g. 1,2,3), "
                         f"got {text!r}") from None


METHOD_HELP = {"dcvit": "drop attention, shrink MLPs (default)", "practise": "drop whole blocks",
               "uvc": "prune heads, head channels, MLP neurons and skip blocks",
               "cait": "grid-keeping token merging plus channel pruning shared by all heads",
               "tome": "training-free token merging"}


def add_structure_arguments(parser, *, with_round: bool = True, methods=("dcvit", "practise")) -> None:
    """Options shared with `dcvit compress`: method, target, block count, candidates, rounding."""
    parser.add_argument("--method", choices=list(methods), default="dcvit",
                        help="; ".join(f"{m}: {METHOD_HELP[m]}" for m in methods))
    parser.add_argument("--target-macs", type=float, required=True, metavar="R",
                        help="fraction of the teacher's MACs to keep, in (0, 1), e.g. 0.75")
    parser.add_argument("--num-blocks", type=int, default=None, metavar="N",
                        help="dcvit: compress N blocks instead of the fewest that reach the target "
                             "(more blocks keep wider MLPs)")
    parser.add_argument("--candidates", default=None, metavar="I,J,...",
                        help="blocks that may be compressed (default: all but the first and the last)")
    if with_round:
        parser.add_argument("--round", type=int, choices=[8, 64], default=None, dest="round_to",
                            help="dcvit: round the hidden width to a multiple of 8 or 64 (the "
                                 "MACs it costs are reported)")


def make_plan(spec, args):
    """The plan object (DCViTPlan or BlockDropPlan) the arguments ask for."""
    candidates = parse_blocks(args.candidates)
    if args.method == "practise":
        if args.num_blocks is not None or args.round_to is not None:
            raise ValueError("--num-blocks and --round apply to --method dcvit only; practise drops "
                             "as many whole blocks as the target needs")
        return plan_block_drop(spec, args.target_macs, candidates=candidates)
    return plan_dcvit(spec, args.target_macs, num_blocks=args.num_blocks, candidates=candidates,
                      round_to=args.round_to)


def plan_json(plan) -> dict:
    """The plan as JSON data with the same core keys for both methods."""
    data = plan.to_dict()
    if data["method"] == "practise":
        data.update(blocks_compressed=plan.blocks_dropped, hidden_width=0)
    return data


def register(subparsers):
    parser = subparsers.add_parser("plan", help="show the structure a MACs target gives (no data needed)",
                                   description=__doc__)
    add_model_arguments(parser, weights=False)
    add_structure_arguments(parser)
    parser.add_argument("--json", action="store_true",
                        help="print a JSON object (blocks_compressed, hidden_width, macs, teacher_macs, ...)")
    parser.set_defaults(func=run)


def run(args):
    spec, name = spec_from_args(args)
    plan = make_plan(spec, args)
    if args.json:
        print(json.dumps(dict(plan_json(plan), model=name), indent=2))
    else:
        print(f"{name} ({args.method})")
        print(plan.summary())
    return 0
