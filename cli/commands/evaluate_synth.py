"""`medgen evaluate-synth`: per-class synthesis quality and class fidelity of a checkpoint against real data
(JSON on stdout; with --out also a Markdown table and PNGs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medgen.cli import common as cli


def register(app: typer.Typer) -> None:
    app.command("evaluate-synth")(evaluate_synth)


@cli.handle_errors
def evaluate_synth(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="A checkpoint file or a `medgen train` run folder.")],
    data: cli.DataOpt = None,
    n: Annotated[int | None, typer.Option("--n", min=1, max=100_000, help="Synthetic volumes per class.",
                                                show_default="as many as real")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the result to this JSON file.",
                                                   show_default="stdout only")] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Also write metrics.json, metrics.md (tables) and PNGs to this new folder."),
    ] = None,
    overwrite: cli.OverwriteOpt = False,
    pairs: Annotated[int, typer.Option("--pairs", min=1, help="Random pairs per set for MS-SSIM.")] = 20,
    classifier_iterations: Annotated[
        int, typer.Option("--classifier-iterations", min=1, help="Training iterations of the feature classifier.")
    ] = 200,
    config: cli.ConfigOpt = None,
    seed: cli.SeedOpt = None,
    device: cli.DeviceOpt = None,
    image_column: cli.ImageColumnOpt = None,
    label_column: cli.LabelColumnOpt = None,
    group_column: cli.GroupColumnOpt = None,
) -> None:
    """Class agreement, real-vs-synthetic AUC, precision/recall/density/coverage, disease effects, MS-SSIM, MMD,
    Frechet distance and the memorisation check, per class and overall, each beside its real-vs-real reference."""
    from medgen.checkpoint import load_checkpoint
    from medgen.data import load_config_data
    from medgen.errors import MedgenError
    from medgen.outputs import atomic_write_json, check_output_dir
    from medgen.pipelines.evaluate_synth import evaluate_synthesis
    from medgen.pipelines.site import refresh_run_page

    if json_path is not None and json_path.is_dir():
        raise MedgenError(f"--json {json_path} is a folder; give a file name, e.g. {json_path / 'quality.json'}")
    if out is not None:
        check_output_dir(out, overwrite=overwrite, inputs=[checkpoint, data, config])
    cfg = cli.load_config(config)
    cli.override_data(cfg, data=data, image_column=image_column, label_column=label_column, group_column=group_column,
                  seed=seed, device=device)
    ckpt = load_checkpoint(checkpoint)
    real = load_config_data(cfg, class_names=ckpt["class_names"], size=ckpt["kwargs"].get("image_size"))
    del ckpt
    result = evaluate_synthesis(checkpoint, real, n_per_class=n, seed=cfg.seed, device=cfg.device, n_pairs=pairs,
                                classifier_iterations=classifier_iterations, out=out, overwrite=overwrite,
                                data_label=cfg.data.path or "phantom")
    if json_path is not None:
        atomic_write_json(json_path, result)
        refresh_run_page(json_path.parent)  # a result saved into a run folder shows on its page
    cli.echo_json(result)
