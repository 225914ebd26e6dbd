"""`medgen anomaly`: reconstruction-error maps and anomaly scores from an autoencoder trained on one class."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medgen.cli.common import DeviceOpt, OutOpt, OverwriteOpt, echo_json, handle_errors


def register(app: typer.Typer) -> None:
    app.command("anomaly")(anomaly)


@handle_errors
def anomaly(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="vae or alpha-gan checkpoint or run folder, "
                                             "trained on the normal class (train --classes CN --holdout 0.25).")],
    out: OutOpt,
    data: Annotated[str | None, typer.Option("--data", help="Volumes to score (phantom folder, datalist, table).",
                                             show_default="the data the run trained on")] = None,
    normal: Annotated[str | None, typer.Option("--normal", help="The normal class.",
                                               show_default="the class the run trained on")] = None,
    sigma: Annotated[float, typer.Option("--sigma", min=0.0, max=10.0,
                                         help="Gaussian smoothing of the error maps (voxels).")] = 1.0,
    maps: Annotated[bool, typer.Option("--maps/--no-maps", help="Write a NIfTI error map and z map per subject.")] = True,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Volumes per forward pass.")] = 8,
    roi: Annotated[Path | None, typer.Option("--roi", help="Region-of-interest mask (NIfTI on the training grid) for "
                                            "the ROI deficit scores.",
                                            show_default="on phantom data hippocampus + ventricles, else none")] = None,
    device: DeviceOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Score the subjects the checkpoint never saw by reconstruction error: NIfTI error and z maps, overlays,
    scores.csv, ROC AUC of each class against the normal one, and where the top 1 % error voxels lie."""
    from medgen.pipelines.anomaly import detect_anomalies

    m = detect_anomalies(checkpoint, data, out, normal=normal, sigma=sigma, maps=maps, batch_size=batch_size, roi=roi,
                         device=device or "auto", overwrite=overwrite)
    echo_json({k: m[k] for k in ("out", "normal", "scored_per_class", "headline_score", "auc", "regions") if k in m}
              | {"out": str(out)})
