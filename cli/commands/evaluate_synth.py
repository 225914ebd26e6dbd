"""`medgen evaluate-synth`: per-class synthesis quality of a checkpoint against real data (JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import (
    ConfigOpt,
    DataOpt,
    DeviceOpt,
    GroupColumnOpt,
    ImageColumnOpt,
    LabelColumnOpt,
    SeedOpt,
    echo_json,
    handle_errors,
)


def register(app: typer.Typer) -> None:
    app.command("evaluate-synth")(evaluate_synth)


@handle_errors
def evaluate_synth(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="A checkpoint file or a `medgen train` run folder.")],
    data: DataOpt = None,
    n: Annotated[int | None, typer.Option("--n", min=1, max=100_000, help="Synthetic volumes per class (default: as many as real).")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the result to this JSON file.")] = None,
    pairs: Annotated[int, typer.Option("--pairs", min=1, help="Random pairs per set for MS-SSIM.")] = 20,
    classifier_iterations: Annotated[
        int, typer.Option("--classifier-iterations", min=1, help="Training iterations of the feature classifier.")
    ] = 200,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    image_column: ImageColumnOpt = None,
    label_column: LabelColumnOpt = None,
    group_column: GroupColumnOpt = None,
) -> None:
    """MS-SSIM (synthetic vs real pairs), MMD, Frechet distance on classifier features, nearest-neighbour check."""
    from medgen.config import load_config, override
    from medgen.errors import MedgenError
    from medgen.evaluation.metrics import evaluate_synthesis
    from medgen.outputs import atomic_write_json
    from medgen.training.checkpoint import load_checkpoint
    from medgen.training.loop import load_config_data

    if json_path is not None and json_path.is_dir():
        raise MedgenError(f"--json {json_path} is a folder; give a file name, e.g. {json_path / 'quality.json'}")
    cfg = load_config(config)
    override(cfg, seed=seed, device=device, data__path=data, data__image_column=image_column,
             data__label_column=label_column, data__group_column=group_column)
    ckpt = load_checkpoint(checkpoint)
    real = load_config_data(cfg, class_names=ckpt["class_names"], size=ckpt["kwargs"].get("image_size"))
    del ckpt
    result = evaluate_synthesis(checkpoint, real, n_per_class=n, seed=cfg.seed, device=cfg.device, n_pairs=pairs,
                                classifier_iterations=classifier_iterations)
    result["data"] = cfg.data.path or "phantom"
    if json_path is not None:
        atomic_write_json(json_path, result)
    echo_json(result)
