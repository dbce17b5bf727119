"""`dcvit plan`: the structure a MACs target gives, without data or training, for every
method whose structure follows from the target alone (a registry entry with a plan):

dcvit: how many blocks lose their attention and the MLP hidden width they keep.
practise: how many whole blocks are dropped (whole blocks only, so the MACs are discrete).
Which blocks are compressed is decided by `dcvit compress` from data; every candidate
block costs the same, so the MACs printed here are the compressed model's.
"""
import json

from dcvit_engine.cli.method_args import add_method_argument, add_method_options, given_options
from dcvit_engine.cli.model_args import add_model_arguments, spec_from_args
from dcvit_engine.compress.api import METHODS, method_plan, plan_defaults, plan_options


def add_target_argument(parser) -> None:
    parser.add_argument("--target-macs", type=float, required=True, metavar="R",
                        help="fraction of the teacher's MACs to keep, in (0, 1), e.g. 0.75")


def planned_methods() -> list[str]:
    return [m for m, entry in METHODS.items() if entry.plan is not None]


def make_plan(spec, args):
    """The plan object (e.g. DCViTPlan, BlockDropPlan) the arguments ask for."""
    # checked against the plan function's options, not the compress function's
    options = given_options(args, args.method, args.plan_option_names, accepted=plan_options(args.method))
    return method_plan(args.method)(spec, args.target_macs, **options)


def register(subparsers):
    parser = subparsers.add_parser("plan", help="show the structure a MACs target gives (no data needed)",
                                   description=__doc__)
    add_model_arguments(parser, weights=False)
    methods = planned_methods()
    add_method_argument(parser, methods)
    add_target_argument(parser)
    names = sorted({n for m in methods for n in plan_options(m)})
    parser.set_defaults(plan_option_names=add_method_options(parser, methods, names,
                                                             defaults_of=plan_defaults))
    parser.add_argument("--json", action="store_true",
                        help="print a JSON object (blocks_compressed, hidden_width, macs, teacher_macs, ...)")
    parser.set_defaults(func=run)


def run(args):
    spec, name = spec_from_args(args)
    plan = make_plan(spec, args)
    if args.json:
        print(json.dumps(dict(plan.to_dict(), model=name), indent=2))
    else:
        print(f"{name} ({args.method})")
        print(plan.summary())
    return 0
