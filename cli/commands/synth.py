"""`medgen synth`: sample volumes from a trained generator into a BIDS-derivative folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer

from medgen.cli.common import DeviceOpt, OutOpt, OverwriteOpt, echo_json, handle_errors


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
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**32 - 1, help="Seed of the latents.")] = 0,
    scale: Annotated[
        Literal["data", "model"],
        typer.Option("--scale", help="Intensity scale: data = the training data's (the recorded normalisation "
                                     "inverted, mixes with the real volumes), model = the model's [-1, 1]."),
    ] = "data",
    skull_stripped: Annotated[
        bool | None,
        typer.Option("--skull-stripped/--not-skull-stripped", help="SkullStripped in the BIDS sidecars.",
                     show_default="true when trained on the phantom, else false"),
    ] = None,
    device: DeviceOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Volumes per forward pass.")] = 8,
    overwrite: OverwriteOpt = False,
) -> None:
    """Write N synthetic volumes to OUT as a BIDS derivative: NIfTI with the training affine and header
    codes, in the training data's intensity scale, with datalist.json and participants.tsv."""
    from medgen.pipelines.synthesize import write_synthetic

    folder = write_synthetic(checkpoint, out, n=n, classes=classes or None, seed=seed, overwrite=overwrite,
                             batch_size=batch_size, device=device or "auto", scale=scale,
                             skull_stripped=skull_stripped)
    datalist = json.loads((folder / "datalist.json").read_text())
    counts: dict[str, int] = {}
    for item in datalist["training"]:
        name = datalist["labels"][str(item["label"])]
        counts[name] = counts.get(name, 0) + 1
    echo_json({"out": str(folder), "n": datalist["numTraining"], "per_class": counts,
               "datalist": str(folder / "datalist.json")})
