"""`medgen synth`: sample volumes from a trained generator into a BIDS-derivative folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from medgen.cli.common import DeviceOpt, OutOpt, OverwriteOpt, SeedOpt, echo_json, handle_errors


def register(app: typer.Typer) -> None:
    app.command("synth")(synth)


@handle_errors
def synth(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="A checkpoint file or a `medgen train` run folder.")],
    out: OutOpt,
    n: Annotated[int, typer.Option("--n", min=1, max=1_000_000, help="Number of volumes, split evenly across the classes.")],
    classes: Annotated[
        list[str] | None, typer.Option("--class", help="Class name to sample (repeatable; default: all).")
    ] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Volumes per forward pass.")] = 8,
    overwrite: OverwriteOpt = False,
) -> None:
    """Write N synthetic volumes (NIfTI with the training affine, datalist.json, participants.tsv) to OUT."""
    from medgen.pipelines.synthesize import write_synthetic

    folder = write_synthetic(checkpoint, out, n=n, classes=classes or None, seed=0 if seed is None else seed,
                             overwrite=overwrite, batch_size=batch_size, device=device or "auto")
    datalist = json.loads((folder / "datalist.json").read_text())
    counts: dict[str, int] = {}
    for item in datalist["training"]:
        name = datalist["labels"][str(item["label"])]
        counts[name] = counts.get(name, 0) + 1
    echo_json({"out": str(folder), "n": datalist["numTraining"], "per_class": counts,
               "datalist": str(folder / "datalist.json")})
