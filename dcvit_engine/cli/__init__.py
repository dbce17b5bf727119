"""The `dcvit` command. Each subcommand lives in its own module with a `register(subparsers)`
function that adds its parser and sets `func`; this file only assembles them. Commands do
argument parsing and printing only: the work is in the library.

The error contract (docs/ARCHITECTURE.md, "Errors"): what a user causes (errors.UserError and
the standard file errors) is printed as one line with exit status 2; SIGINT exits 130 and
SIGTERM 143, after the writers have removed their temporary files; every other exception is
a bug and keeps its traceback. DCVIT_DEBUG=1 prints the traceback of a one-line error too.
"""
import argparse
import importlib
import os
import re
import shlex
import signal
import sys
import traceback
from contextlib import contextmanager

from dcvit_engine.errors import UserError, describe_os_error, is_user_os_error

# Module names under dcvit_engine.cli, in the order `dcvit --help` lists them.
COMMAND_MODULES = ["doctor", "info", "bench", "infer", "plan", "compress", "export", "eval", "sweep", "demo",
                   "reproduce"]
DEBUG_ENV_VAR = "DCVIT_DEBUG"
EXIT_USER_ERROR, EXIT_SIGINT, EXIT_SIGTERM = 2, 130, 143


class CommandError(UserError):
    """A user-facing error found by a command's own checks: one line, exit status 2."""


class UsageError(UserError):
    """Options argparse refuses (unknown, missing, or a value its type rejects)."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse's errors as one line, like every other user error (no usage block), and
    returned by main() as exit status 2 instead of exiting from inside parse_args."""

    def error(self, message):
        # "argument --batch-size: must be >= 1, got '0'" -> "--batch-size must be >= 1, got '0'"
        message = re.sub(r"^argument (\S+?)(/\S+)?: (must be)", r"\1 \3", message)
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every writer's cleanup (atomic.py) runs."""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="dcvit",
        description="Few-shot dense compression of Vision Transformers, run with fused kernels.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"dcvit_engine.cli.{name}").register(subparsers)
    return parser


def user_message(exc: BaseException) -> str | None:
    """The one line for an error the user caused, None for anything else (a bug)."""
    if isinstance(exc, UserError):
        message = str(exc)
    elif is_user_os_error(exc) or (isinstance(exc, OSError) and exc.errno is None and type(exc) in (
            FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)):
        message = describe_os_error(exc)  # errno None: a message the project wrote
    else:
        return None
    # a backend refusal lists each backend's reason on its own line
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM (timeout, docker stop, schedulers) raises Terminated in the main thread."""
    def raise_terminated(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def resume_command(args, add: str = "--resume", drop=("--overwrite",)) -> str:
    """The command line that was run, with `add` (once) and without the flags in `drop`: what
    to type to continue an interrupted run."""
    words = [w for w in args.argv if w not in drop]
    return shlex.join(["dcvit", *words, *([add] if add and add not in words else [])])


def _interrupted(args, what: str) -> str:
    """"dcvit CMD: interrupted", and what was kept and how to resume when the command said so
    (a callable `args.on_interrupt` it sets once it has something to keep)."""
    note = getattr(args, "on_interrupt", None)
    return f"dcvit {args.command}: {what}" + (f"; {note()}" if note is not None else "")


def main(argv=None) -> int:
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    try:
        args = build_parser().parse_args(argv)
    except UsageError as err:
        print(err, file=sys.stderr)
        return EXIT_USER_ERROR
    args.argv = argv
    try:
        with sigterm_as_interrupt():
            result = args.func(args)
    except Terminated:
        print(_interrupted(args, "terminated"), file=sys.stderr)
        return EXIT_SIGTERM
    except KeyboardInterrupt:
        print(_interrupted(args, "interrupted"), file=sys.stderr)
        return EXIT_SIGINT
    except Exception as exc:
        message = user_message(exc)
        if message is None:
            raise
        if os.environ.get(DEBUG_ENV_VAR, "") not in ("", "0"):
            traceback.print_exc()
        print(f"dcvit {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    return int(result or 0)
