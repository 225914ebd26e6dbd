"""`medgen traverse`: latent interpolations and traversals of a vae or alpha-gan, as NIfTI series and PNG strips."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medgen.cli.common import DeviceOpt, OutOpt, OverwriteOpt, echo_json, handle_errors


def register(app: typer.Typer) -> None:
    app.command("traverse")(traverse)


@handle_errors
def traverse(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="vae or alpha-gan checkpoint or run folder.")],
    out: OutOpt,
    data: Annotated[str | None, typer.Option("--data", help="Real volumes (phantom folder, datalist, table).",
                                             show_default="the data the run trained on")] = None,
    subject_a: Annotated[str | None, typer.Option("--subject-a", help="Start subject.",
                                                  show_default="the first held-out subject of the first class")] = None,
    subject_b: Annotated[str | None, typer.Option("--subject-b", help="End subject.",
                                                  show_default="the first held-out subject of the last class")] = None,
    steps: Annotated[int, typer.Option("--steps", min=2, max=64, help="Volumes per walk, endpoints included.")] = 7,
    dims: Annotated[int, typer.Option("--dims", min=0, max=256, help="Latent dimensions to walk along.")] = 6,
    spread: Annotated[float, typer.Option("--spread", min=0.1, max=10.0,
                                          help="Dimension walks span +-this many SDs of the data's codes.")] = 2.5,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Volumes per forward pass.")] = 8,
    device: DeviceOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Interpolate between two real subjects' codes, move the class condition (CN -> MCI -> AD) at a fixed code, and
    walk along single latent dimensions; NIfTI volumes with the training geometry, labelled PNG strips."""
    from medgen.pipelines.traverse import traverse as run
    from medgen.runtime import resolve_device

    info = run(checkpoint, data, out, subject_a=subject_a, subject_b=subject_b, steps=steps, dims=dims,
               spread=spread, batch_size=batch_size, device=resolve_device(device or "auto"), overwrite=overwrite)
    echo_json({"out": str(out), "subject_a": info["subject_a"], "subject_b": info["subject_b"],
               "classes": info["classes"], "dims": [d["dim"] for d in info["dims"]],
               "volumes": sum(len(v) for v in info["files"].values())})
