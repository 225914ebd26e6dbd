"""`medgen train MODEL`: train a generative model with the one training loop."""

from __future__ import annotations

import contextlib
import os
from typing import Annotated

import typer

from medgen.cli import common as cli


def register(app: typer.Typer) -> None:
    app.command("train")(train)


@cli.handle_errors
def train(
    model: Annotated[str, typer.Argument(help="A registered generative model (`medgen info` lists them).")],
    out: cli.OutOpt,
    data: cli.DataOpt = None,
    config: cli.ConfigOpt = None,
    iterations: Annotated[int | None, typer.Option("--iterations", min=1, help="Training iterations.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Batch size.")] = None,
    max_minutes: Annotated[
        float | None,
        typer.Option("--max-minutes", min=0.01,
                     help="Time budget: stop (with a final checkpoint) after this many minutes (train.max_seconds)."),
    ] = None,
    seed: cli.SeedOpt = None,
    device: cli.DeviceOpt = None,
    precision: Annotated[
        str | None, typer.Option("--precision", help="auto, fp32, tf32, bf16 or fp16.")
    ] = None,
    compile_: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="torch.compile the encoder/generator forwards.")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from RUN/last.pt.")] = False,
    overwrite: cli.OverwriteOpt = False,
    image_column: cli.ImageColumnOpt = None,
    label_column: cli.LabelColumnOpt = None,
    group_column: cli.GroupColumnOpt = None,
) -> None:
    """Train MODEL on DATA (default: the built-in phantom cohort); RUN gets checkpoints, log, montages, config."""
    from medgen.data import load_config_data
    from medgen.errors import MedgenError
    from medgen.models.registry import get_model_class, list_models
    from medgen.outputs import check_output_dir, output_lock
    from medgen.training.loop import fit
    from medgen.training.preflight import preflight_train

    get_model_class(model)  # unknown name -> clear error before any data is read
    if model not in list_models(generative=True):
        raise MedgenError(f"the {model} is trained by `medgen cv-evaluate`; train takes a generative model "
                          f"({', '.join(list_models(generative=True))})")
    cfg = cli.load_config(config)
    cli.override_data(cfg, data=data, image_column=image_column, label_column=label_column, group_column=group_column,
                  seed=seed, device=device, train__iterations=iterations, train__batch_size=batch_size,
                  train__precision=precision, train__compile=compile_,
                  train__max_seconds=None if max_minutes is None else max_minutes * 60.0)

    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 owns the run folder
    if rank0:
        check_output_dir(out, overwrite=overwrite, resume=resume, inputs=[data, config])
    with output_lock(out) if rank0 else contextlib.nullcontext():
        dataset = load_config_data(cfg)
        preflight_train(model, cfg.models.get(model, {}), cfg.steps.get(model, {}), dataset, cfg.train.precision,
                        cfg.device)
        result = fit(model, dataset, out, model_kwargs=cfg.models.get(model, {}),
                     step_kwargs=cfg.steps.get(model, {}), train=cfg.train, device=cfg.device, seed=cfg.seed,
                     resume=resume, overwrite=overwrite, config=cfg.to_dict())
    if not rank0:
        return
    last = result.history[-1] if result.history else {}
    cli.echo_json({
        "model": model,
        "run": str(out),
        "checkpoint": str(result.checkpoint),
        "iterations": result.iterations,
        "seconds": round(result.seconds, 2),
        "iterations_per_second": round(result.iterations / result.seconds, 3) if result.seconds > 0 else None,
        "stopped_by_time": result.stopped_by_time,
        "last": {k: v for k, v in last.items() if k not in ("iteration", "seconds")},
    })
