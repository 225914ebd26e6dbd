"""`medgen cv-evaluate`: the leakage-safe K-fold augmentation experiment with statistics and a report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from medgen.cli import common as cli


def register(app: typer.Typer) -> None:
    app.command("cv-evaluate")(cv_evaluate)


def _split_list(value: str, what: str, cast: type) -> list:
    from medgen.errors import MedgenError

    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise MedgenError(f"{what} is empty")
    try:
        return [cast(v) for v in items]
    except ValueError:
        raise MedgenError(f"{what} must be a comma-separated list of {cast.__name__} values, got {value!r}") from None


@cli.handle_errors
def cv_evaluate(
    out: cli.OutOpt,
    config: cli.ConfigOpt = None,
    data: cli.DataOpt = None,
    models: Annotated[
        str | None, typer.Option("--models", help="Generators to compare, comma-separated.",
                                 show_default=cli.config_default("cv.models"))
    ] = None,
    fractions: Annotated[
        str | None, typer.Option("--fractions", help="Synthetic shares of the training set, comma-separated.",
                                 show_default=cli.config_default("cv.fractions"))
    ] = None,
    folds: Annotated[int | None, typer.Option("--folds", min=2, help="Cross-validation folds.",
                                              show_default=cli.config_default("cv.folds"))] = None,
    seed: cli.SeedOpt = None,
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="Folds run at once in this many local processes, "
                                 "sharing the machine's threads (2 on a 2-core CPU).",
                                 show_default=cli.config_default("cv.workers"))
    ] = None,
    fold: Annotated[
        int | None, typer.Option("--fold", min=0, help="Run only this fold (0-based); jobs share --out, then merge.",
                                 show_default="all folds")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted run: finished folds and arms are skipped.")
    ] = False,
    merge: Annotated[
        bool, typer.Option("--merge", help="Only combine the finished folds in --out into the results.")
    ] = False,
    launcher: Annotated[
        Literal["local", "slurm"] | None,
        typer.Option("--launcher", help="Run each fold as a job through submitit and merge: slurm (a job array; "
                     "resources in the config's launcher section) or local (processes on this machine).",
                     show_default="one process")
    ] = None,
    tensorboard: Annotated[
        bool | None,
        typer.Option("--tensorboard/--no-tensorboard", help="TensorBoard event files in every generator and "
                     "classifier run folder (pip install 'medgen[tensorboard]').",
                     show_default=cli.config_default("train.tensorboard")),
    ] = None,
    overwrite: cli.OverwriteOpt = False,
    device: cli.DeviceOpt = None,
    image_column: cli.ImageColumnOpt = None,
    label_column: cli.LabelColumnOpt = None,
    group_column: cli.GroupColumnOpt = None,
) -> None:
    """Does synthetic data help a classifier? Subject-level K-fold CV with a held-out test set: per fold,
    train each generator on the training subjects, then classifiers on real only, real + classical
    augmentation, real + synthetic at each fraction (with and without augmentation) and synthetic
    only (TSTR). Writes results.json/.csv/.md and plots to OUT and prints the table."""
    from medgen.outputs import check_output_dir, output_lock
    from medgen.pipelines.cv import merge as merge_folds
    from medgen.pipelines.cv import run_cv
    from medgen.training.hooks import require_tensorboard

    if merge:
        merge_folds(Path(out), echo=True)
        return
    if launcher is not None:
        from medgen.errors import MedgenError
        from medgen.pipelines.launch import check_launcher

        if fold is not None:
            raise MedgenError("--launcher runs every fold as its own job; it does not combine with --fold")
        check_launcher(launcher)
    cfg = cli.load_config(config)
    cli.override_data(cfg, data=data, image_column=image_column, label_column=label_column, group_column=group_column,
                  seed=seed, device=device, cv__folds=folds, cv__workers=workers, train__tensorboard=tensorboard)
    if cfg.train.tensorboard:
        require_tensorboard()
    if models is not None:
        cfg.cv.models = _split_list(models, "--models", str)
    if fractions is not None:
        cfg.cv.fractions = _split_list(fractions, "--fractions", float)
    check_output_dir(out, overwrite=overwrite, resume=resume or fold is not None, inputs=[data, config])
    # one writer per run folder; separate --fold jobs share it by design, so each locks its fold
    with output_lock(out if fold is None else Path(out).with_name(f"{Path(out).name}.fold_{fold}")):
        if launcher is not None:
            from medgen.pipelines.launch import run_cv_jobs

            run_cv_jobs(cfg, out, launcher=launcher, resume=resume, overwrite=overwrite, echo=True)
        else:
            run_cv(cfg, out, fold=fold, resume=resume, overwrite=overwrite, echo=True)
