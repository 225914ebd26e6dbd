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
    model: Annotated[cli.GenerativeModel, typer.Argument(help="The generative model to train.")],
    out: cli.OutOpt,
    data: cli.DataOpt = None,
    config: cli.ConfigOpt = None,
    iterations: Annotated[int | None, typer.Option("--iterations", min=1, help="Training iterations.",
                                                   show_default=cli.config_default("train.iterations"))] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Batch size.",
                                                   show_default=cli.config_default("train.batch_size"))] = None,
    max_minutes: Annotated[
        float | None,
        typer.Option("--max-minutes", min=0.01,
                     help="Time budget: stop (with a final checkpoint) after this many minutes (train.max_seconds)."),
    ] = None,
    classes: Annotated[
        list[str] | None,
        typer.Option("--classes", help="Train on these classes only (repeatable or comma-separated, e.g. CN).",
                     show_default="config train.classes = none: all"),
    ] = None,
    holdout: Annotated[
        float | None,
        typer.Option("--holdout", min=0.0, max=0.95, help="Share of every class's subjects held out of training "
                     "(seeded, stratified; listed in RUN/split.json).", show_default=cli.config_default("train.holdout")),
    ] = None,
    size: Annotated[int | None, typer.Option("--size", help="Training grid (voxels per side: 16, 32, 64, 128, 256).",
                                             show_default=cli.config_default("data.size"))] = None,
    input_noise: Annotated[
        float | None,
        typer.Option("--input-noise", min=0.0, max=1.0, help="vae only: denoising training with input noise levels "
                     "drawn from [0, this] (steps.vae.input_noise; 0.2 = 0-20 %).", show_default="config steps.vae"),
    ] = None,
    seed: cli.SeedOpt = None,
    device: cli.DeviceOpt = None,
    precision: Annotated[
        cli.Precision | None, typer.Option("--precision", help="Numeric precision (auto: the fastest measured on "
                                           "the device).", show_default=cli.config_default("train.precision"))
    ] = None,
    compile_: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="torch.compile the encoder/generator forwards.",
                                  show_default=cli.config_default("train.compile"))
    ] = None,
    progress_every: Annotated[
        int | None,
        typer.Option("--progress-every", min=1, help="Iterations between plain progress lines when stderr is not "
                     "a terminal (batch jobs, log files).",
                     show_default="config train.progress_every = none: about 20 lines a run"),
    ] = None,
    tensorboard: Annotated[
        bool | None,
        typer.Option("--tensorboard/--no-tensorboard", help="Log losses, sample montages and validation metrics "
                     "to RUN/tensorboard (pip install 'medgen[tensorboard]').",
                     show_default=cli.config_default("train.tensorboard")),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from RUN/last.pt.")] = False,
    overwrite: cli.OverwriteOpt = False,
    image_column: cli.ImageColumnOpt = None,
    label_column: cli.LabelColumnOpt = None,
    group_column: cli.GroupColumnOpt = None,
) -> None:
    """Train MODEL on DATA (default: the built-in phantom cohort); RUN gets checkpoints, log, montages, config."""
    from medgen.data import load_config_data
    from medgen.evaluation.splits import training_selection
    from medgen.outputs import atomic_write_json, check_output_dir, output_lock
    from medgen.pipelines.site import write_page_safely
    from medgen.runtime import resolve_device, resolve_precision
    from medgen.training.hooks import require_tensorboard
    from medgen.training.loop import fit
    from medgen.training.preflight import preflight_train

    cfg = cli.load_config(config)
    cli.override_data(cfg, data=data, image_column=image_column, label_column=label_column, group_column=group_column,
                  seed=seed, device=device, train__iterations=iterations, train__batch_size=batch_size,
                  train__precision=precision, train__compile=compile_, train__progress_every=progress_every,
                  train__tensorboard=tensorboard,
                  train__max_seconds=None if max_minutes is None else max_minutes * 60.0,
                  train__holdout=holdout, data__size=size,
                  train__classes=None if not classes else [c.strip() for v in classes for c in v.split(",") if c.strip()])
    if input_noise is not None:
        if model != "vae":
            cli.fail(f"--input-noise is an option of the vae (denoising training), not of {model}")
        cfg.steps.setdefault("vae", {})["input_noise"] = float(input_noise)
    # everything the options alone decide is checked before any volume is read
    resolve_precision(cfg.train.precision, resolve_device(cfg.device))
    if cfg.train.tensorboard:
        require_tensorboard()

    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 owns the run folder
    if rank0:
        check_output_dir(out, overwrite=overwrite, resume=resume, inputs=[data, config])
    with output_lock(out) if rank0 else contextlib.nullcontext():
        dataset = load_config_data(cfg)
        split = None
        if cfg.train.classes or cfg.train.holdout > 0:
            keep, split = training_selection(dataset.subjects, dataset.labels.numpy(), dataset.class_names,
                                             classes=cfg.train.classes, holdout=cfg.train.holdout, seed=cfg.seed)
            dataset = dataset.subset(keep)
        preflight_train(model, cfg.models.get(model, {}), cfg.steps.get(model, {}), dataset, cfg.train.precision,
                        cfg.device)
        result = fit(model, dataset, out, model_kwargs=cfg.models.get(model, {}),
                     step_kwargs=cfg.steps.get(model, {}), train=cfg.train, device=cfg.device, seed=cfg.seed,
                     resume=resume, overwrite=overwrite, config=cfg.to_dict())
        if split is not None and rank0:
            atomic_write_json(out / "split.json", split)  # who trained and who was held out
    if not rank0:
        return
    write_page_safely(out, "train")  # RUN/index.html (`medgen report` collects many)
    last = result.history[-1] if result.history else {}
    cli.echo_json({
        "model": model,
        "run": str(out),
        "checkpoint": str(result.checkpoint),
        "iterations": result.iterations,
        "seconds": round(result.seconds, 2),
        "iterations_per_second": round(result.iterations / result.seconds, 3) if result.seconds > 0 else None,
        "stopped_by_time": result.stopped_by_time,
        "train_subjects": len(set(dataset.subjects)),
        **({"held_out_subjects": len(split["held_out"]), "split": str(out / "split.json")} if split else {}),
        "last": {k: v for k, v in last.items() if k not in ("iteration", "seconds")},
    })
