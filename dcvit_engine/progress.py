"""Progress bars that suit where the output goes.

On a terminal: tqdm's bar, redrawn in place. Anywhere else (a log file, a pipe, a CI log):
plain lines, one every PLAIN_INTERVAL_S seconds and one at the end, with no carriage
returns, so a redirected log stays readable instead of filling with redrawn bars.

Inside `with RunProgress(phases):` every bar also counts towards that command's overall line
(steps done of the plan's, time elapsed, time left estimated from the steps timed so far).
"""
from __future__ import annotations

import sys
import time

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
    run = active_run()  # a disabled bar's steps count too (e.g. a method's quiet scoring runs)
    bar_type, extra = (tqdm, {}) if run is None else (_CountedBar, dict(run=run, kind=step_kind(desc)))
    if disable or (hasattr(stream, "isatty") and stream.isatty()):
        return bar_type(iterable, total=total, desc=desc, disable=disable, unit=unit, leave=leave,
                        file=stream, **extra)
    return bar_type(iterable, total=total, desc=desc, unit=unit, leave=True, file=_LineWriter(stream),
                    mininterval=PLAIN_INTERVAL_S, maxinterval=PLAIN_INTERVAL_S, bar_format=PLAIN_FORMAT,
                    **extra)


# The overall progress of a command: its plan (phases of steps, each of a kind whose step
# costs about the same everywhere: DeepInversion steps, training steps) and an estimate of the
# time left from the steps timed so far. Every progress_bar opened while a RunProgress is
# active counts its steps towards it, so the phases' bars make up one overall line.
_ACTIVE: list[RunProgress] = []
MAX_PHASES_LISTED = 6
MIN_TIMED_STEPS = 3  # steps of a kind timed before its cost is trusted for an estimate
DEEPINVERSION, TRAINING = "DeepInversion", "training"


def step_kind(desc: str | None) -> str:
    return DEEPINVERSION if desc and desc.startswith("metric set") else TRAINING


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class RunProgress:
    """phases: [(label, steps, kind)] in the order they run. Prints, to `stream`, the overall
    line when a phase's bar closes and at most every PLAIN_INTERVAL_S seconds, and one
    estimate line as soon as the first MIN_TIMED_STEPS steps were timed."""

    def __init__(self, phases, stream=None, clock=time.perf_counter, interval_s: float = PLAIN_INTERVAL_S):
        self.phases = [(label, int(steps), kind) for label, steps, kind in phases if steps > 0]
        self.planned: dict[str, int] = {}
        for _, steps, kind in self.phases:
            self.planned[kind] = self.planned.get(kind, 0) + steps
        self.done = {kind: 0 for kind in self.planned}
        self.timed = {kind: [0, 0.0] for kind in self.planned}  # steps, seconds
        self.stream, self.clock, self.interval_s = stream or sys.stderr, clock, interval_s
        self.started = self.last_step = self.last_line = clock()
        self.estimated = False

    @property
    def total_steps(self) -> int:
        return sum(self.planned.values())

    def describe_plan(self) -> str:
        parts = "; ".join(f"{label}: {steps} {kind} steps" for label, steps, kind in self.phases)
        if len(self.phases) > MAX_PHASES_LISTED:  # one line: a long plan is summed per kind
            parts = f"{len(self.phases)} phases, " + " + ".join(
                f"{steps} {kind}" for kind, steps in self.planned.items())
        return f"plan: {parts or 'no iterative phases'} ({self.total_steps} steps)"

    def seconds_left(self) -> tuple[float | None, list[str]]:
        """(seconds the timed kinds still need or None when nothing was timed, untimed kinds left)."""
        left, untimed = 0.0, []
        for kind, planned in self.planned.items():
            remaining = max(planned - self.done.get(kind, 0), 0)
            steps, seconds = self.timed[kind]
            if remaining and steps < MIN_TIMED_STEPS:
                untimed.append(kind)
            elif remaining:
                left += remaining * seconds / steps
        if len(untimed) == len(self.planned):
            return None, untimed
        return left, untimed

    def estimate_text(self) -> str:
        left, untimed = self.seconds_left()
        if left is None:
            return "no estimate yet (no step timed so far)"
        text = f"about {format_seconds(left)} left on this device"
        if untimed and not left:
            text = f"no estimate yet for the {', '.join(untimed)} steps (none timed so far)"
        elif untimed:
            text = f"at least {format_seconds(left)} left ({', '.join(untimed)} steps not timed yet)"
        return text

    def line(self) -> str:
        done, total = sum(self.done.values()), max(self.total_steps, 1)
        return (f"overall: {done}/{self.total_steps} steps ({100 * done / total:.0f}%), "
                f"{format_seconds(self.clock() - self.started)} elapsed, {self.estimate_text()}")

    def _print(self, text: str) -> None:
        tqdm.write(text, file=self.stream)
        self.last_line = self.clock()

    def bar_opened(self) -> None:
        self.last_step = self.clock()  # time between phases (scoring, copies) is not a step's

    def step(self, kind: str, n: int = 1) -> None:
        now = self.clock()
        if kind in self.done:
            self.done[kind] += n
            self.timed[kind][0] += n
            self.timed[kind][1] += now - self.last_step
        self.last_step = now
        if not self.estimated and self.seconds_left()[0] is not None:
            self.estimated = True
            self._print(f"estimate after the first timed steps: {self.estimate_text()}")
        elif now - self.last_line >= self.interval_s:
            self._print(self.line())

    def bar_closed(self) -> None:
        self._print(self.line())

    def __enter__(self) -> RunProgress:
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)


def active_run() -> RunProgress | None:
    return _ACTIVE[-1] if _ACTIVE else None


class _CountedBar(tqdm):
    """A tqdm whose update() and close() also reach the active RunProgress."""

    def __init__(self, *args, run: RunProgress, kind: str, **kwargs):
        self._run, self._kind = run, kind
        super().__init__(*args, **kwargs)
        run.bar_opened()

    def update(self, n=1):
        if getattr(self, "_run", None) is not None:
            self._run.step(self._kind, n)
        return super().update(n)

    def close(self):
        if getattr(self, "_run", None) is not None:
            run, self._run = self._run, None
            super().close()
            run.bar_closed()
        else:
            super().close()

    def __iter__(self):  # tqdm's own iteration bypasses update(): count each item here
        for item in self.iterable:
            yield item
            self.update()
        self.close()
