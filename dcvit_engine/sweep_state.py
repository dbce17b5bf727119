"""A sweep's output folder as it runs: every finished row is written at once, so an
interrupted sweep loses only the row it was computing, and `--resume` skips the rows done.

The folder holds sweep_state.json (the settings of the sweep and every finished row),
sweep.csv (one line per row) and sweep.md (the mean ± std table), each replaced atomically
after every row (dcvit_engine.atomic): whatever moment a sweep dies, the three agree and
are complete. A resume with other settings is refused, naming each setting that differs,
since its rows would mix two experiments. metric_sets/ caches the synthetic metric sets
(and an unfinished synthesis' checkpoint), so a resume does not synthesize them again.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path

from .atomic import atomic_open
from .errors import RunStateError
from .jsonfile import load_json_file

STATE_FILENAME = "sweep_state.json"
CSV_FILENAME = "sweep.csv"
TABLE_FILENAME = "sweep.md"
PLOT_FILENAME = "sweep.png"
METRIC_SETS = "metric_sets"
STATE_FORMAT = 1
OUTPUTS = (STATE_FILENAME, CSV_FILENAME, TABLE_FILENAME, PLOT_FILENAME)  # what --overwrite replaces


def row_key(method: str, target: float | None, seed: int | None) -> tuple:
    """What identifies a row of a sweep: its method label, target and seed."""
    return (method, None if target is None else float(target), seed)


class SweepState:
    """The finished rows of the sweep in `folder` with `settings` (JSON data; each key is an
    option, e.g. "targets"), persisted after every row.

    resume: continue the sweep there (refused when its settings differ; a folder without a
    sweep starts afresh). overwrite: replace an earlier sweep's files. Without either, a
    folder that is not empty is refused, so an earlier result is never silently replaced.
    """

    def __init__(self, folder: str | os.PathLike, settings: dict, *, resume: bool = False,
                 overwrite: bool = False):
        from .sweep import SweepRow

        self.folder = Path(folder)
        self.settings = json.loads(json.dumps(settings))  # as they compare after loading
        self.rows: list = []
        self.resumed = False
        state_file = self.folder / STATE_FILENAME
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"--out {self.folder} is a file; give a folder")
        if resume and state_file.is_file():
            saved = load_json_file(state_file, hint=f"add --overwrite to start {self.folder} over")
            if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
                raise RunStateError(f"{state_file} is not a dcvit sweep state; add --overwrite to start over")
            self._check_settings(saved.get("settings", {}))
            names = {f.name for f in fields(SweepRow)}
            try:
                self.rows = [SweepRow(**{k: v for k, v in row.items() if k in names})
                             for row in saved["rows"]]
            except (TypeError, AttributeError, KeyError):
                raise RunStateError(f"{state_file} holds rows this version cannot read; add --overwrite to "
                                    "start over") from None
            self.resumed = True
        elif self.folder.exists() and any(self.folder.iterdir()) and not overwrite:
            what = "holds an earlier sweep" if state_file.is_file() else "is not empty"
            hint = "--resume to continue it or " if state_file.is_file() else ""
            raise RunStateError(f"--out {self.folder} {what}; add {hint}--overwrite to replace its "
                                f"{', '.join(OUTPUTS)}")
        elif overwrite and self.folder.exists():
            for name in OUTPUTS:
                (self.folder / name).unlink(missing_ok=True)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _check_settings(self, saved) -> None:
        if not isinstance(saved, dict):
            raise RunStateError(f"{self.folder / STATE_FILENAME}: 'settings' is not a JSON object; "
                                "add --overwrite to start over")
        differ = sorted(k for k in set(saved) | set(self.settings) if saved.get(k) != self.settings.get(k))
        if differ:
            detail = "; ".join(f"--{k.replace('_', '-')} was {saved.get(k)!r}, now {self.settings.get(k)!r}"
                               for k in differ)
            raise RunStateError(f"cannot resume the sweep in {self.folder}: its settings differ ({detail}); "
                                "give the same options, or --overwrite to start over")

    @property
    def csv_path(self) -> Path:
        return self.folder / CSV_FILENAME

    @property
    def table_path(self) -> Path:
        return self.folder / TABLE_FILENAME

    @property
    def done(self) -> set:
        """row_key of every finished row."""
        return {row_key(r.method, r.target, r.seed) for r in self.rows}

    def add(self, row) -> None:
        """Keep a finished row: state, CSV and table replaced atomically, the state last (so a
        row it lists is in the other two)."""
        from .sweep import format_table, write_csv

        self.rows.append(row)
        write_csv(self.rows, self.folder / CSV_FILENAME)
        with atomic_open(self.folder / TABLE_FILENAME, encoding="utf-8") as f:
            f.write(format_table(self.rows) + "\n")
        with atomic_open(self.folder / STATE_FILENAME, encoding="utf-8") as f:
            f.write(json.dumps(dict(format=STATE_FORMAT, settings=self.settings,
                                    rows=[asdict(r) for r in self.rows]), indent=2))

    def kept(self) -> str:
        """What an interruption keeps, for the message printed then."""
        finished = sum(r.method != "teacher" for r in self.rows)
        return (f"{finished} finished row(s) in {self.csv_path} and {self.table_path} (and the synthetic "
                f"metric sets in {self.folder / METRIC_SETS})")
