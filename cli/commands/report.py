"""`medgen report`: a static HTML site (index of runs + a page per run) from run folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medgen.cli.common import OutOpt, OverwriteOpt, echo_json, handle_errors


def register(app: typer.Typer) -> None:
    app.command("report")(report)


@handle_errors
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (train, cv-evaluate, segment, traverse, anomaly, denoise), "
                                                    "evaluate-synth JSON files, or folders holding them (searched a few levels deep).")],
    out: OutOpt,
    title: Annotated[str, typer.Option("--title", help="Title of the index page.")] = "medgen runs",
    overwrite: OverwriteOpt = False,
) -> None:
    """Build OUT/index.html (every run: kind, model, data, date, key figures; sortable) and a page per run with
    its config, loss curves, montages and metrics. Self-contained: opens from file://, no network."""
    from medgen.pipelines.site import build_site

    echo_json(build_site(runs, out, overwrite=overwrite, title=title))
