"""The cv-evaluate report: results.json / .csv / .md, the charts, and the table on stdout."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from medgen.evaluation.report import table_rows, to_csv, to_markdown
from medgen.outputs import atomic_write_bytes, atomic_write_json, atomic_write_text
from medgen.viz import plot_accuracy, plot_confusions


def print_table(results: dict[str, Any]) -> None:
    """Print the summary table to stdout (rich)."""
    header, rows = table_rows(results)
    table = Table(title=f"cv-evaluate: {results['folds']} folds (accuracy %, mean ± SD)")
    for h in header:
        table.add_column(h, justify="left" if h == "arm" else "right")
    for r in rows:
        table.add_row(*r)
    Console(file=sys.stdout, width=200).print(table)


def write_report(out: str | Path, results: dict[str, Any], echo: bool = False) -> None:
    """Write results.json, results.csv, results.md, accuracy.png and confusion.png (each atomically)."""
    out = Path(out)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.csv", to_csv(results))
    atomic_write_text(out / "results.md", to_markdown(results))
    atomic_write_bytes(out / "accuracy.png", plot_accuracy(results))
    atomic_write_bytes(out / "confusion.png", plot_confusions(results))
    if echo:
        print_table(results)
