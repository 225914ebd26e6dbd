"""`medgen segment`: unsupervised segmentation with a trained parallel-decoder VAE, with metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medgen.cli.common import DeviceOpt, OutOpt, OverwriteOpt, echo_json, handle_errors


def register(app: typer.Typer) -> None:
    app.command("segment")(segment)


@handle_errors
def segment(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="parallel-vae checkpoint or run folder.")],
    data: Annotated[str, typer.Option("--data", help="A `medgen scenes` folder or volume data (phantom folder, datalist, table).")],
    out: OutOpt,
    n: Annotated[int | None, typer.Option("--n", min=1, help="Use the first N images only.",
                                          show_default="all")] = None,
    panels: Annotated[int, typer.Option("--panels", min=0, help="Per-sample picture panels to write.")] = 16,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Inference batch size.")] = 16,
    device: DeviceOpt = None,
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**32 - 1, help="Random seed.")] = 0,
    overwrite: OverwriteOpt = False,
) -> None:
    """Write per-image segmentations, picture panels, a latent traversal and metrics (FG-ARI, mSC, Dice, probe)."""
    from medgen.pipelines.segment import segment as run

    metrics = run(checkpoint, data, out, n=n, panels=panels, batch_size=batch_size, device=device or "auto",
                  seed=seed, overwrite=overwrite)
    metrics.pop("traversal_dims", None)
    echo_json(metrics)
