"""`medgen train MODEL`: train a generative model with the one training loop."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import (
    ConfigOpt,
    DataOpt,
    DeviceOpt,
    GroupColumnOpt,
    ImageColumnOpt,
    LabelColumnOpt,
    OutOpt,
    OverwriteOpt,
    SeedOpt,
    echo_json,
    handle_errors,
)


def register(app: typer.Typer) -> None:
    app.command("train")(train)


@handle_errors
def train(
    model: Annotated[str, typer.Argument(help="Registered generative model: vae, gan, alpha-gan, parallel-vae.")],
    out: OutOpt,
    data: DataOpt = None,
    config: ConfigOpt = None,
    iterations: Annotated[int | None, typer.Option("--iterations", min=1, help="Training iterations.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Batch size.")] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    precision: Annotated[
        str | None, typer.Option("--precision", help="auto, fp32, tf32, bf16 or fp16.")
    ] = None,
    compile_: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="torch.compile the encoder/generator forwards.")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from RUN/last.pt.")] = False,
    overwrite: OverwriteOpt = False,
    image_column: ImageColumnOpt = None,
    label_column: LabelColumnOpt = None,
    group_column: GroupColumnOpt = None,
) -> None:
    """Train MODEL on DATA (default: the built-in phantom cohort); RUN gets checkpoints, log, montages, config."""
    from medgen.config import load_config, override
    from medgen.errors import MedgenError
    from medgen.models.registry import get_model_class
    from medgen.training.loop import fit, load_config_data

    if model == "classifier":
        raise MedgenError("the classifier is trained by `medgen cv-evaluate`; train takes a generative model")
    get_model_class(model)  # unknown name -> clear error before any data is read
    cfg = load_config(config)
    override(cfg, seed=seed, device=device, data__path=data, data__image_column=image_column,
             data__label_column=label_column, data__group_column=group_column,
             train__iterations=iterations, train__batch_size=batch_size, train__precision=precision,
             train__compile=compile_)
    import contextlib
    import os

    from medgen.outputs import check_output_dir, output_lock

    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 owns the run folder
    if rank0:
        check_output_dir(out, overwrite=overwrite, resume=resume, inputs=[data, config])
    with output_lock(out) if rank0 else contextlib.nullcontext():
        dataset = load_config_data(cfg)
        from medgen.training.preflight import preflight_train

        preflight_train(model, cfg.models.get(model, {}), cfg.steps.get(model, {}), dataset, cfg.train.precision,
                        cfg.device)
        result = fit(model, dataset, out, model_kwargs=cfg.models.get(model, {}),
                     step_kwargs=cfg.steps.get(model, {}), train=cfg.train, device=cfg.device, seed=cfg.seed,
                     resume=resume, overwrite=overwrite, config=cfg.to_dict())
    if not rank0:
        return
    last = result.history[-1] if result.history else {}
    echo_json({
        "model": model,
        "run": str(out),
        "checkpoint": str(result.checkpoint),
        "iterations": result.iterations,
        "seconds": round(result.seconds, 2),
        "iterations_per_second": round(result.iterations / result.seconds, 3) if result.seconds > 0 else None,
        "stopped_by_time": result.stopped_by_time,
        "last": {k: v for k, v in last.items() if k not in ("iteration", "seconds")},
    })
