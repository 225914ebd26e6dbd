"""The one training loop for every model: a Step per model does the model-specific part.

fit() is a short loop over a TrainState (training/state.py: model, optimizers, scalers, EMA, RNGs, batch
order; its checkpoint round trip makes `resume=True` continue bit-exactly) writing into a RunDir
(training/run_dir.py: config.yaml, log.csv, samples/, last.pt, final.pt, best.pt), with hooks
(training/hooks.py) for validation, sample montages and TensorBoard (train.tensorboard). Progress goes to
stderr: a bar on a terminal, plain lines every train.progress_every iterations otherwise. Per iteration: the state draws a batch (own
seeded order), applies the optional augmentation, calls the Step, checks the losses are finite and
updates the EMA; then validation, the log row, the montage and the checkpoint, each when due.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medgen.checkpoint import (
    load_checkpoint,
    to_plain,
)
from medgen.config import TrainConfig
from medgen.console import IterationProgress, log
from medgen.data.dataset import ImageSet
from medgen.errors import MedgenError
from medgen.models.registry import create_model, model_defaults
from medgen.runtime import (
    compile_model,
    configure_backends,
    default_channels_last,
    default_space_to_depth,
    guard_bf16_convs,
    has_instance_norm,
    resolve_device,
    resolve_precision,
    to_channels_last,
    use_space_to_depth_stems,
)
from medgen.training import distributed
from medgen.training.hooks import (
    TENSORBOARD_DIR,
    LossCurve,
    Montage,
    SamplePrior,
    TensorBoard,
    Validation,
    reference_images,
    require_tensorboard,
)
from medgen.training.run_dir import RunDir
from medgen.training.state import TrainState, check_resume, data_fingerprint
from medgen.training.steps import Batch, create_step


@dataclass
class FitResult:
    """What a training run produced.

    Attributes:
        checkpoint: the final checkpoint (final.pt).
        best: best.pt when validation selected one, else None.
        history: logged rows (iteration, seconds, losses, validation metrics).
        seconds: total training seconds (across resumes).
        iterations: completed iterations.
        run_dir: the run folder.
        stopped_by_time: True when train.max_seconds ended the run early.
    """

    checkpoint: Path
    best: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    iterations: int = 0
    run_dir: Path | None = None
    stopped_by_time: bool = False


def fill_model_kwargs(model_name: str, model_kwargs: dict[str, Any], data: ImageSet) -> dict[str, Any]:
    """Fill num_classes, spatial_dims, in_channels, image_size from the data where the model takes them.

    A given value that contradicts the data is an error (a wrong size would fail later, less clearly).
    """
    takes = model_defaults(model_name)
    from_data = {
        "num_classes": len(data.class_names),
        "spatial_dims": data.spatial_dims,
        "in_channels": int(data.images.shape[1]),
        "image_size": int(data.images.shape[2]),
    }
    kwargs = dict(model_kwargs)
    for key, value in from_data.items():
        if key not in takes:
            continue
        if key in kwargs and kwargs[key] is not None and kwargs[key] != value:
            raise MedgenError(f"models.{model_name}.{key} is {kwargs[key]} but the data has {key} {value}")
        kwargs[key] = value
    return kwargs


_NOTED: set[str] = set()


def prepare_model(model: nn.Module, train: TrainConfig, device: torch.device) -> nn.Module:
    """Move to the device, set the memory format and compile submodules (in place; state-dict keys unchanged).

    Defaults per device come from medgen.runtime (channels_last_3d with bf16 on CPU and on CUDA, except
    for models with instance norm on CPU; under CPU bf16, convs on maps smaller than their kernel in fp32;
    space-to-depth input convs on CPU; cudnn.benchmark on CUDA). In a data-parallel run (torchrun) BatchNorm becomes SyncBatchNorm on CUDA
    and rank 0's weights are copied to every rank; gradients are averaged in StepContext.backward_step.
    """
    model = distributed.sync_batchnorm(model, device)
    model.to(device)
    configure_backends(device)
    if device.type == "cpu" and resolve_precision(train.precision, device).name == "bf16":
        # oneDNN's bf16 backward is wrong for convs whose kernel is larger than their input: those run in fp32
        guarded = guard_bf16_convs(model)
        note = (f"bf16: {len(guarded)} conv layer(s) on maps smaller than their kernel run in fp32 "
                f"({', '.join(guarded[:3])}{', ...' if len(guarded) > 3 else ''})")
        if guarded and note not in _NOTED:  # once per process: cv-evaluate trains many classifiers
            _NOTED.add(note)
            log(note)
    channels_last = train.channels_last
    if channels_last is None:
        channels_last = default_channels_last(device) and not (device.type == "cpu" and has_instance_norm(model))
    if channels_last:
        to_channels_last(model)
    if default_space_to_depth(device):
        use_space_to_depth_stems(model)  # same weights and results, faster 1-channel input convs
    distributed.broadcast_model(model)
    if train.compile:
        # Compiles the encoder/generator/decoder forwards in place (state-dict keys unchanged); critics stay
        # eager because the gradient penalty needs their double backward, which torch.compile lacks.
        compile_model(model)
    return model


def fit(
    model_name: str,
    data: ImageSet,
    out: str | Path,
    *,
    model_kwargs: dict[str, Any] | None = None,
    step_kwargs: dict[str, Any] | None = None,
    train: TrainConfig | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    validate: Callable[[nn.Module], dict[str, float]] | None = None,
    validate_every: int = 0,
    select_metric: str | None = None,
    transform: Callable[[Batch, torch.Generator], Batch] | None = None,
    model: nn.Module | None = None,
    config: dict[str, Any] | None = None,
) -> FitResult:
    """Train a registered model on an ImageSet and write the run folder.

    Args:
        model_name: registry name (also selects the Step).
        data: training images and labels.
        out: run folder (refused when non-empty unless resume or overwrite).
        model_kwargs: model constructor kwargs; num_classes/spatial_dims/in_channels/image_size are
            filled from the data when the model takes them.
        step_kwargs: the Step's hyper-parameters.
        train: loop settings (iterations, batch size, lr, EMA decay, precision, intervals, max_seconds).
        device: "auto" | "cpu" | "cuda" or a torch.device.
        seed: seeds model init, batch order, Step noise and augmentation.
        resume: continue from out/last.pt.
        overwrite: delete an existing run folder's contents first.
        validate: callable(model) -> metrics, called every validate_every iterations and at the end
            with the EMA model (the raw model when train.ema_decay == 0), in eval mode under no_grad.
        validate_every: 0 means only at the end.
        select_metric: metric name (higher is better) whose improvement writes best.pt.
        transform: callable(Batch, generator) -> Batch applied to each CPU batch (augmentation).
        model: an already built model to train instead of create_model(model_name, **model_kwargs).
        config: the resolved run config (plain dict) written to config.yaml and into checkpoints.
    """
    train = train or TrainConfig()
    dev = resolve_device(device) if isinstance(device, str) else device
    dist_info, dev = distributed.init_distributed(dev)  # no-op unless launched by torchrun
    rank, world = dist_info.rank, dist_info.world_size
    run = RunDir(out, main=rank == 0)
    run.check(overwrite=overwrite, resume=resume)
    check_inputs(data, train, world)
    if train.tensorboard:
        require_tensorboard()
    resuming = run.open(overwrite=overwrite, resume=resume)
    state = build_state(model_name, data, train, dev, seed, rank, world, model, model_kwargs, step_kwargs)
    cfg_dict = to_plain(config) if config is not None else {
        "seed": seed, "train": dataclasses.asdict(train),
        "models": {model_name: state.kwargs}, "steps": {model_name: state.step_kwargs},
    }
    history: list[dict[str, Any]] = []
    if resuming:
        ckpt = load_checkpoint(run.last, expected_model=model_name)
        check_resume(ckpt, cfg_dict, seed, state.fingerprint, run.last)  # same data, seed and config
        state.load_checkpoint(ckpt, str(run.last))
        history = run.read_log(state.iteration)
    else:
        run.write_config(cfg_dict)
    validation = Validation(validate, validate_every, select_metric) if validate is not None else None
    ref, ref_labels = reference_images(data.images, data.labels, len(data.class_names))
    montage = Montage(train.sample_every, data.class_names, model_name, ref, ref_labels)
    sample_prior = SamplePrior(data.images, data.labels)
    curves = LossCurve(train.sample_every or train.checkpoint_every, model_name)
    t0, stopped_by_time = time.perf_counter(), False

    def seconds() -> float:
        return state.seconds_before + time.perf_counter() - t0

    state.model.train()
    tensorboard = None
    if train.tensorboard and run.main:
        tensorboard = TensorBoard(run.path / TENSORBOARD_DIR, purge_step=state.iteration + 1 if resuming else None)
    every = train.progress_every or max(1, train.iterations // 20)
    try:
        with IterationProgress(f"train {model_name}", train.iterations, state.iteration, every) as progress:
            while state.iteration < train.iterations:
                values = state.train_step(data, transform, run.good_checkpoint)
                it, now = state.iteration, seconds()
                stopped_by_time = train.max_seconds is not None and now >= train.max_seconds
                done = it == train.iterations or stopped_by_time
                checkpoint = functools.partial(state.checkpoint, data, cfg_dict, now)
                metrics = validation(state, run, checkpoint) if validation and validation.due(it, done) else {}
                if it % max(train.log_every, 1) == 0 or done:
                    history.append({"iteration": it, "seconds": round(now, 3), **values,
                                    **{f"val_{k}": v for k, v in metrics.items()}})
                    run.append_log(history[-1], history)
                    if tensorboard is not None:
                        tensorboard.scalars(history[-1])
                save = bool(train.checkpoint_every and it % train.checkpoint_every == 0) or done
                if save or montage.due(it, done):
                    sample_prior(state)
                if montage.due(it, done):
                    montage(state, run)
                    if tensorboard is not None:
                        tensorboard.image(run.montage_path(it), it)
                if curves.due(it, done):
                    curves(run, history)
                if save:
                    state.check_finite_weights(run.good_checkpoint)  # never write or name good NaN weights
                    run.save_last(checkpoint())
                progress.update(it, values, final=done)
                if stopped_by_time:
                    log(f"time budget of {train.max_seconds:g} s reached at iteration {it}")
                    break
    finally:
        if tensorboard is not None:
            tensorboard.close()
    total = seconds()
    run.finalise(functools.partial(state.checkpoint, data, cfg_dict, total))
    return FitResult(checkpoint=run.final, best=run.best if run.best.is_file() else None, history=history,
                     seconds=total, iterations=state.iteration, run_dir=run.path, stopped_by_time=stopped_by_time)


def check_inputs(data: ImageSet, train: TrainConfig, world: int) -> None:
    """One-line errors for data or loop settings that cannot train."""
    if len(data) == 0:
        raise MedgenError("the training data holds no images")
    if train.iterations < 1 or train.batch_size < 1:
        raise MedgenError("train.iterations and train.batch_size must be at least 1")
    distributed.local_batch_size(min(train.batch_size, len(data)), world)  # the global batch splits evenly


def build_state(model_name: str, data: ImageSet, train: TrainConfig, dev: torch.device, seed: int, rank: int,
                world: int, model: nn.Module | None, model_kwargs: dict[str, Any] | None,
                step_kwargs: dict[str, Any] | None) -> TrainState:
    """Model (seeded init), Step, prepared model, optimizers, scalers, EMA, batch order and RNG streams."""
    precision = resolve_precision(train.precision, dev)
    torch.manual_seed(seed)
    if model is None:
        kwargs = fill_model_kwargs(model_name, model_kwargs or {}, data)
        model = create_model(model_name, **kwargs)
    else:
        kwargs = dict(getattr(model, "init_kwargs", model_kwargs or {}))
    step_kwargs = dict(step_kwargs or {})
    step = create_step(model_name, **step_kwargs)
    model = prepare_model(model, train, dev)
    return TrainState(model_name, model, kwargs, step_kwargs, step, lr=train.lr, ema_decay=train.ema_decay,
                      precision=precision, device=dev, n_items=len(data), batch_size=train.batch_size, seed=seed,
                      total_iterations=train.iterations, rank=rank, world=world,
                      fingerprint=data_fingerprint(data))


