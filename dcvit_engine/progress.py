"""Progress bars that suit where the output goes.

On a terminal: tqdm's bar, redrawn in place. Anywhere else (a log file, a pipe, a CI log):
plain lines, one every PLAIN_INTERVAL_S seconds and one at the end, with no carriage
returns, so a redirected log stays readable instead of filling with redrawn bars.
"""
from __future__ import annotations

import sys

from tqdm import tqdm

PLAIN_INTERVAL_S = 30.0
PLAIN_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {elapsed} elapsed, {remaining} left"


class _LineWriter:
    """A file for tqdm that turns each redraw ("\\r" + bar) into one line of its own."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable=None, *, total: int | None = None, desc: str | None = None,
                 disable: bool = False, unit: str = "it", leave: bool = False, stream=None) -> tqdm:
    """tqdm(iterable, total=..., desc=...) on a terminal; plain progress lines elsewhere."""
    stream = sys.stderr if stream is None else stream
    if disable or (hasattr(stream, "isatty") and stream.isatty()):
        return tqdm(iterable, total=total, desc=desc, disable=disable, unit=unit, leave=leave, file=stream)
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=True, file=_LineWriter(stream),
                mininterval=PLAIN_INTERVAL_S, maxinterval=PLAIN_INTERVAL_S, bar_format=PLAIN_FORMAT)
