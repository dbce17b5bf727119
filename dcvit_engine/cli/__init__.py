"""The `dcvit` command. Each subcommand lives in its own module with a `register(subparsers)`
function that adds its parser and sets `func`; this file only assembles them. Commands do
argument parsing and printing only: the work is in the library.
"""
import argparse
import importlib
import sys

from dcvit_engine.ops.dispatch import BackendUnavailableError

# Module names under dcvit_engine.cli, in the order `dcvit --help` lists them.
COMMAND_MODULES = ["doctor", "info", "bench", "infer", "plan", "compress", "export", "eval", "sweep", "demo",
                   "reproduce"]


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcvit",
        description="Few-shot dense compression of Vision Transformers, run with fused kernels.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"dcvit_engine.cli.{name}").register(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (CommandError, ValueError, FileNotFoundError, NotADirectoryError, TypeError,
            BackendUnavailableError) as exc:
        # Library code raises these with messages written for users; show just the message,
        # on one line (a backend refusal lists each backend's reason on its own line).
        message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"dcvit {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dcvit {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)
