"""dcvit_engine.progress: plain lines off a terminal, tqdm's bar on one."""
import io

from dcvit_engine.progress import progress_bar


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_plain_lines_without_carriage_returns():
    log = io.StringIO()
    for _ in progress_bar(range(7), desc="finetune", unit="step", stream=log):
        pass
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines[0].startswith("finetune: 0/7 step") and lines[-1].startswith("finetune: 7/7 step (100%)")


def test_a_terminal_gets_the_redrawn_bar():
    terminal = _Terminal()
    with progress_bar(total=3, desc="metric set", stream=terminal) as bar:
        bar.update(3)
    assert "\r" in terminal.getvalue() and "metric set:   0%" in terminal.getvalue()  # redrawn, then cleared


def test_disabled_writes_nothing():
    log = io.StringIO()
    for _ in progress_bar(range(3), desc="x", disable=True, stream=log):
        pass
    assert log.getvalue() == ""
