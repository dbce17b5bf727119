"""How a method offers its keyword options on the command line: a method module's
CLI_OPTIONS maps option names to CliOption (dcvit_engine.cli.method_args makes the flags),
and the value types the options share."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import InputError


@dataclass(frozen=True)
class CliOption:
    """How `dcvit compress` (and `dcvit plan`) offer one keyword option of a method: a method
    module's CLI_OPTIONS maps option names to these. The CLI adds each method's default, read
    off its signature; type defaults to the type of that default."""
    help: str
    type: Callable | None = None
    choices: tuple | None = None
    flag: str | None = None      # default: --option-name
    metavar: str | None = None


def block_list(text: str) -> list[int]:
    """'1,2,5' -> [1, 2, 5]: block indices as the command line gives them (--candidates)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--candidates takes block indices separated by commas (e.g. 1,2,3), "
                         f"got {text!r}") from None
