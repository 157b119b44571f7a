"""One progress display for a whole study run: the stage, the notebook running, cells measured out of those to
measure, elapsed time and an estimate of the time left.

Cells are counted as their result files appear under `<output>/cells/` (a notebook stores each cell as it is
measured), so the display moves inside a notebook, not only between them. The estimate of the time left is,
per kind of measurement, the seconds per cell measured in this run so far; for a kind this run has not measured
yet, the seconds per cell of the stored results of an earlier run (their `group_wall_time`), else this run's
mean over every kind. Before any cell has a time, there is no estimate ("ETA: -").
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

POLL_S = 2.0  # how often the result files are counted


def _format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def group_seconds(cell_folder: Path, since: str = "") -> tuple[list[float], int]:
    """The measuring time of each group of cells stored in one `<output>/cells/<model>_<dataset>/<kind>` folder,
    and how many cells they hold. A group's cells are measured together (shared prefills, interleaved rounds) and
    each stores `group_wall_time`, the seconds since its group began, and its group's `provenance.created_at`: a
    group's time is its last cell's. Cells without `created_at` are grouped by their time to the second (groups
    that store every cell as they end share one value). File times cannot order them: a checkout rewrites them.
    since: only groups created at or after this ISO time (UTC, as `created_at`), e.g. one run's."""
    groups: dict[str, float] = {}
    cells = 0
    for path in cell_folder.glob("*.json"):
        try:
            cell = json.loads(path.read_text())
            wall = float(cell["group_wall_time"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        created = (cell.get("provenance") or {}).get("created_at")
        if since and (not created or created < since):
            continue
        key = created or f"{round(wall)}"
        cells += 1
        groups[key] = max(groups.get(key, 0.0), wall)
    return list(groups.values()), cells


def stored_seconds_per_cell(cell_folder: Path) -> float | None:
    """Seconds per cell of the results stored in one cells folder (see group_seconds)."""
    walls, cells = group_seconds(cell_folder)
    return sum(walls) / cells if cells else None


class StudyProgress:
    """The display of one run. `pending` maps each kind to the cells this run has to measure; `cells_dir` is where
    their result files appear. Use as a context manager; `log` prints above the display."""

    def __init__(self, pending: dict[str, int], cells_dir: Path, console: Console | None = None) -> None:
        self.pending = {kind: n for kind, n in pending.items() if n}
        self.total = sum(self.pending.values())
        self.cells_dir = cells_dir
        self.console = console or Console(stderr=True)
        self.started = time.perf_counter()
        self._initial = self._count_by_kind()
        self._done: dict[str, int] = {}
        self._seconds: dict[str, float] = {}  # seconds spent measuring each kind in this run
        self._kind: str | None = None  # the kind of the notebook running
        self._kind_started = self.started
        self._prior = self._prior_seconds_per_cell()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._display = Progress(
            TextColumn("[bold]{task.fields[stage]}[/bold] {task.description}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("cells"),
            TextColumn("elapsed"),
            TimeElapsedColumn(),
            TextColumn("ETA {task.fields[eta]}"),
            console=self.console,
            transient=False,
        )
        self._task = self._display.add_task("", total=max(self.total, 1), stage="starting", eta="-")

    # ------------------------------------------------------------------------------------------- counting

    def _count_by_kind(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        if self.cells_dir.is_dir():
            for folder in self.cells_dir.glob("*/*"):
                if folder.is_dir():
                    counts[folder.name] = counts.get(folder.name, 0) + sum(1 for _ in folder.glob("*.json"))
        return counts

    def _prior_seconds_per_cell(self) -> dict[str, float]:
        prior: dict[str, list[float]] = {}
        if self.cells_dir.is_dir():
            for folder in self.cells_dir.glob("*/*"):
                if folder.is_dir() and folder.name in self.pending:
                    seconds = stored_seconds_per_cell(folder)
                    if seconds is not None:
                        prior.setdefault(folder.name, []).append(seconds)
        return {kind: statistics.median(values) for kind, values in prior.items()}

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            self.refresh()

    def refresh(self) -> None:
        """Count the result files written since the run began, and update the display."""
        counts = self._count_by_kind()
        with self._lock:
            new = {kind: counts.get(kind, 0) - self._initial.get(kind, 0) for kind in self.pending}
            self._done = {kind: min(max(new[kind], 0), n) for kind, n in self.pending.items()}
            done = sum(self._done.values())
            eta = self.eta()
        self._display.update(self._task, completed=done, eta=_format_duration(eta))

    # ------------------------------------------------------------------------------------------- the estimate

    def _measured_seconds(self) -> dict[str, float]:
        seconds = dict(self._seconds)
        if self._kind is not None:
            seconds[self._kind] = seconds.get(self._kind, 0.0) + time.perf_counter() - self._kind_started
        return seconds

    def eta(self) -> float | None:
        """Seconds left: each kind's remaining cells times its seconds per cell (see the module's docstring)."""
        seconds = self._measured_seconds()
        rates = {kind: seconds[kind] / n for kind, n in self._done.items() if n and seconds.get(kind)}
        overall = sum(seconds.get(k, 0.0) for k in rates) / max(sum(self._done.get(k, 0) for k in rates), 1)
        left = 0.0
        for kind, n in self.pending.items():
            remaining = n - self._done.get(kind, 0)
            if not remaining:
                continue
            rate = rates.get(kind) or self._prior.get(kind) or (overall if rates else None)
            if rate is None:
                return None
            left += remaining * rate
        return left

    # ------------------------------------------------------------------------------------------- the run

    def stage(self, stage: str, label: str = "", kind: str | None = None) -> None:
        """A notebook starts: its stage, its label, and the kind of cells it measures (None: it measures none)."""
        with self._lock:
            now = time.perf_counter()
            if self._kind is not None:
                self._seconds[self._kind] = self._seconds.get(self._kind, 0.0) + now - self._kind_started
            self._kind, self._kind_started = kind, now
        self._display.update(self._task, stage=stage, description=label)
        self.refresh()

    def log(self, message: str) -> None:
        self._display.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def __enter__(self) -> StudyProgress:
        self._display.start()
        self._thread = threading.Thread(target=self._poll, name="kvlib-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stage("done" if exc[0] is None else "stopped")
        self._stop.set()
        self._thread.join(timeout=POLL_S * 2)
        self._display.stop()


def file_logger(path: Path) -> Callable[[str], None]:
    """A log function that appends timestamped lines to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        with path.open("a", encoding="utf-8") as handle:
            handle.write(f"{time.strftime('%H:%M:%S')} {message}\n")

    return log
