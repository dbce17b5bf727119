"""Reading JSON the project wrote (specs, reports, run states, manifests) without trusting it:
a file too large, nested too deep or holding the wrong type is refused with one line naming
the file, before anything acts on its content."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import InputError, ResourceLimitError

MAX_JSON_BYTES = 64 * 2**20  # far above any spec, report or run state the project writes
MAX_JSON_DEPTH = 32  # the deepest the project writes is about 6


def _depth(data) -> int:
    """Nesting depth, without recursion (a hostile file cannot exhaust the stack here)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def parse_json(text: str, what: str, *, expect: type | None = dict, max_depth: int = MAX_JSON_DEPTH,
               hint: str = ""):
    """The data in `text` (what: how to name its source in a message), refused when invalid,
    nested deeper than max_depth or (with expect) not of that type."""
    suffix = f"; {hint}" if hint else ""
    try:
        data = json.loads(text)
    except RecursionError:
        raise ResourceLimitError(f"{what} is nested too deeply to be read (more than {max_depth} "
                                 f"levels){suffix}") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{what} is not valid JSON ({err}){suffix}") from None
    if _depth(data) > max_depth:
        raise ResourceLimitError(f"{what} is nested {_depth(data)} levels deep, more than the "
                                 f"{max_depth} allowed{suffix}")
    if expect is not None and not isinstance(data, expect):
        raise InputError(f"{what} holds a JSON {type(data).__name__}, expected a JSON "
                         f"{'object' if expect is dict else expect.__name__}{suffix}")
    return data


def load_json_file(path: str | os.PathLike, *, expect: type | None = dict, max_bytes: int = MAX_JSON_BYTES,
                   max_depth: int = MAX_JSON_DEPTH, hint: str = ""):
    """parse_json on the UTF-8 file at `path`, refused before reading when over max_bytes."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise ResourceLimitError(f"{path} is {size} bytes, more than the {max_bytes} allowed for a "
                                 f"JSON file{'; ' + hint if hint else ''}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path} is not UTF-8 text ({err}){'; ' + hint if hint else ''}") from None
    return parse_json(text, str(path), expect=expect, max_depth=max_depth, hint=hint)
