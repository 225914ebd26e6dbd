"""Progress bars and log lines on stderr (rich); results go to stdout elsewhere.

On a terminal (or in Jupyter) progress is a rich bar; when stderr is not a terminal (a batch job, a log
file) training prints plain, uncut progress lines instead (IterationProgress).
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

console = Console(stderr=True)


def quiet() -> bool:
    """True when MEDGEN_QUIET=1 (tests, batch jobs): no progress bars."""
    return os.environ.get("MEDGEN_QUIET", "") == "1"


def interactive() -> bool:
    """True when stderr is a terminal (or Jupyter), where progress bars redraw in place."""
    return bool(console.is_terminal or console.is_jupyter)


def plain_lines() -> None:
    """Print plain progress lines instead of live bars in this process (worker processes sharing a terminal)."""
    global console
    console = Console(stderr=True, force_terminal=False, force_jupyter=False)


def log(message: str) -> None:
    """Write one progress/log line to stderr (not wrapped at 80 columns when stderr is not a terminal)."""
    if not quiet():
        console.print(message, highlight=False, soft_wrap=not interactive())


def make_progress() -> Progress:
    """A rich Progress on stderr with count, elapsed and remaining time."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=quiet(),
        transient=False,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar on stderr.

    Args:
        items: what to iterate over.
        description: label shown left of the bar.
        total: number of items when `items` has no len().
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with make_progress() as progress:
        task = progress.add_task(description, total=total, info="")
        for item in items:
            yield item
            progress.advance(task)


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


class IterationProgress:
    """Progress of an iterative job on stderr: a rich bar on a terminal, else a plain line every `every`
    iterations and at the end (iteration, the latest values, it/s, elapsed, ETA); nothing when quiet.

    Args:
        description: label of the bar / first word of each line.
        total: iterations of the whole job.
        completed: iterations done before this process started (a resumed run).
        every: iterations between plain lines (at least 1).
    """

    def __init__(self, description: str, total: int, completed: int = 0, every: int = 1) -> None:
        self.description, self.total, self.start, self.every = description, int(total), int(completed), max(1, int(every))
        self.values: dict[str, float] = {}
        self.last_line = -1
        self.bar: Progress | None = None
        self.t0 = time.perf_counter()

    def __enter__(self) -> IterationProgress:
        self.t0 = time.perf_counter()
        if interactive() or quiet():
            self.bar = make_progress()
            self.bar.__enter__()
            self.task = self.bar.add_task(self.description, total=self.total, completed=self.start, info="")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.bar is not None:
            self.bar.__exit__(exc_type, exc, tb)

    def update(self, completed: int, values: Mapping[str, float] | None = None, final: bool = False) -> None:
        """Record progress: `completed` iterations done, the latest `values` (losses), `final` for the last one."""
        if values is not None:
            self.values = {k: float(v) for k, v in values.items()}
        info = " ".join(f"{k} {v:.4g}" for k, v in self.values.items())
        if self.bar is not None:
            self.bar.update(self.task, completed=completed, info=info)
            return
        if completed == self.last_line or not (final or completed % self.every == 0 or completed == self.total):
            return
        self.last_line = completed
        elapsed = time.perf_counter() - self.t0
        rate = (completed - self.start) / elapsed if elapsed > 0 else 0.0
        if completed >= self.total:
            eta = "ETA 0:00:00"
        elif final:
            eta = "stopped early"  # a time budget (train.max_seconds) ended the job
        else:
            eta = f"ETA {_clock((self.total - completed) / rate)}" if rate > 0 else "ETA ?"
        pct = 100.0 * completed / self.total if self.total else 100.0
        parts = [f"{self.description}: iteration {completed}/{self.total} ({pct:.0f}%)"]
        if info:
            parts.append(info)
        parts.append(f"{rate:.3g} it/s, elapsed {_clock(elapsed)}, {eta}")
        console.file.write(" | ".join(parts) + "\n")
        console.file.flush()
