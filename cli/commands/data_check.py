"""`medgen data-check`: validate a dataset and summarise it (classes, subjects, shapes, spacings, intensities)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from medgen.cli import common as cli


def register(app: typer.Typer) -> None:
    app.command("data-check")(data_check)


@cli.handle_errors
def data_check(
    data: cli.DataOpt = None,
    image_column: cli.ImageColumnOpt = None,
    label_column: cli.LabelColumnOpt = None,
    group_column: cli.GroupColumnOpt = None,
    folds: Annotated[
        int | None, typer.Option("--folds", min=2, help="Also check every class has this many subjects.",
                                 show_default="no check")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Check a dataset before training: prints a summary to stdout; exit 1 with one line on any problem."""
    if not data:
        cli.fail("--data is required (a phantom folder, datalist JSON or CSV/TSV table)")

    from medgen.data.check import check_dataset
    from medgen.data.datalist import detect_kind

    if detect_kind(data) == "scenes":
        _scenes_summary(data, as_json)
        return
    report = check_dataset(
        data,
        image_column=image_column or "image",
        label_column=label_column or "label",
        group_column=group_column,
        folds=folds,
    )
    summary = report.summary()
    if as_json:
        cli.echo_json(summary)
    else:
        _print_tables(summary)
    problems = summary["problems"]
    if problems:
        n_more = len(problems) - 1
        more = f" (+{n_more} more problem{'s' if n_more > 1 else ''}, see the summary)" if n_more else ""
        cli.fail(problems[0] + more)


def _print_tables(summary: dict) -> None:
    """The summary as rich tables on stdout."""
    from rich.console import Console
    from rich.table import Table

    out = Console(file=sys.stdout, highlight=False, soft_wrap=True)
    out.print(f"[bold]{summary['kind']}[/bold] {summary['source']}: {summary['scans']} scans, "
              f"{summary['subjects']} subjects, {len(summary['classes'])} classes"
              + (", tissue maps" if summary["tissue_maps"] else ""))

    classes = Table(title="Classes")
    for col in ("class", "subjects", "scans"):
        classes.add_column(col, justify="left" if col == "class" else "right")
    for c in summary["classes"]:
        classes.add_row(c["name"], str(c["subjects"]), str(c["scans"]))
    out.print(classes)

    def tally(d: dict) -> str:
        return ", ".join(f"{k} ({v})" for k, v in d.items()) or "-"

    images = Table(title="Images (before preprocessing)")
    images.add_column("property")
    images.add_column("values (count)")
    images.add_row("shape", tally(summary["shapes"]))
    images.add_row("spacing (mm)", tally(summary["spacings_mm"]))
    images.add_row("orientation", tally(summary["orientations"]))
    images.add_row("dtype", tally(summary["dtypes"]))
    inten = summary["intensity"]
    if inten["min"] is not None:
        images.add_row("intensity", f"min {inten['min']:.4g}, max {inten['max']:.4g}, median p0.5 "
                                    f"{inten['median_p0.5']:.4g}, median p99.5 {inten['median_p99.5']:.4g}")
    out.print(images)

    for note in summary.get("notes", []):
        out.print(f"note: {note}")
    if summary["problems"]:
        problems = Table(title=f"Problems ({len(summary['problems'])})")
        problems.add_column("problem")
        for p in summary["problems"]:
            problems.add_row(p)
        out.print(problems)
    else:
        out.print("no problems found")


def _scenes_summary(data: str, as_json: bool) -> None:
    """A `medgen scenes` folder: loading it validates every scene; print counts, shape and value range."""
    from medgen.data import load_dataset

    scenes = load_dataset(data)
    summary = {
        "source": str(data),
        "kind": "scenes",
        "items": len(scenes),
        "scenes": len(set(scenes.subjects)),
        "shape": list(scenes.images.shape[1:]),
        "intensity": {"min": float(scenes.images.min()), "max": float(scenes.images.max())},
        "problems": [],
        "ok": True,
    }
    if as_json:
        cli.echo_json(summary)
    else:
        typer.echo(f"scenes {data}: {summary['items']} images of {summary['scenes']} scenes, shape "
                   f"{'x'.join(map(str, summary['shape']))}, values {summary['intensity']['min']:.3g}.."
                   f"{summary['intensity']['max']:.3g}; no problems found")
