"""`medgen export RUN --out DIR`: a trained generator as a MONAI bundle that samples volumes without medgen."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medgen.cli.common import OutOpt, OverwriteOpt, echo_json, handle_errors


def register(app: typer.Typer) -> None:
    app.command("export")(export)


@handle_errors
def export(
    run: Annotated[Path, typer.Argument(help="A `medgen train` run folder (vae, gan or alpha-gan) or a checkpoint file.")],
    out: OutOpt,
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Export the EMA weights when the checkpoint has them.")] = True,
    overwrite: OverwriteOpt = False,
) -> None:
    """Write RUN's generator to OUT as a MONAI bundle (configs/, models/model.ts + model.pt): `python -m
    monai.bundle run --config_file OUT/configs/inference.json --bundle_root OUT --class_name AD` writes NIfTI
    volumes with the training affine and intensity scale, no medgen needed."""
    from medgen.pipelines.export import export_bundle

    folder = export_bundle(run, out, overwrite=overwrite, ema=ema)
    echo_json({
        "out": str(folder),
        "sampler": str(folder / "models" / "model.ts"),
        "run": f"python -m monai.bundle run --config_file {folder}/configs/inference.json "
               f"--meta_file {folder}/configs/metadata.json --bundle_root {folder} --class_name CLASS "
               "--num_samples 4 --seed 0 --output_dir OUTPUT_DIR",
    })
