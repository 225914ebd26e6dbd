"""Progress bars and log lines on stderr (rich); results go to stdout elsewhere."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
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


def log(message: str) -> None:
    """Write one progress/log line to stderr."""
    if not quiet():
        console.print(message, highlight=False)


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
