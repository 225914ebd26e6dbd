"""What fit() does between iterations besides stepping: validation (and best.pt), sample montages (with a real
reference row per class), the loss-curve picture of log.csv, and TensorBoard event files (train.tensorboard)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from medgen.errors import MedgenError
from medgen.models.sampling import can_sample, encode, sample_images
from medgen.training.run_dir import RunDir
from medgen.training.state import TrainState
from medgen.viz import save_loss_curves, save_montage

MONTAGE_SEED = 1234
MONTAGE_PER_CLASS = 2
GAIN_SEED = 4321  # the latents of the samples the detail gain is fitted to


@dataclass
class Validation:
    """Calls `fn(model)` every `every` iterations (0: only at the end) and at the end, with the EMA model
    (the raw one without EMA) in eval mode under no_grad; an improved `select_metric` writes best.pt."""

    fn: Callable[[nn.Module], dict[str, float]]
    every: int = 0
    select_metric: str | None = None

    def due(self, iteration: int, done: bool) -> bool:
        return done or bool(self.every and iteration % self.every == 0)

    def __call__(self, state: TrainState, run: RunDir, checkpoint: Callable[[], dict[str, Any]]) -> dict[str, float]:
        model = state.infer_model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            metrics = {k: float(v) for k, v in self.fn(model).items()}
        model.train(was_training)
        if self.select_metric is not None:
            if self.select_metric not in metrics:
                raise MedgenError(f"validation returned no metric {self.select_metric!r} (got: {', '.join(metrics)})")
            if metrics[self.select_metric] > state.best_value:
                state.best_value = metrics[self.select_metric]
                run.save_best(checkpoint())
        return metrics


@dataclass
class Montage:
    """Every `every` iterations (0: never) and at the end: a montage of EMA samples, MONTAGE_PER_CLASS per
    class from a fixed seed, to samples/iter_NNNNNN.png, beside the `reference` real images (one per class)."""

    every: int
    class_names: list[str]
    title: str
    reference: torch.Tensor | None = None
    reference_labels: list[int] | None = None

    def due(self, iteration: int, done: bool) -> bool:
        return bool(self.every and (iteration % self.every == 0 or done))

    def __call__(self, state: TrainState, run: RunDir) -> None:
        model = state.infer_model
        if not (run.main and can_sample(model)):
            return
        labels = torch.arange(len(self.class_names)).repeat_interleave(MONTAGE_PER_CLASS)
        images = sample_images(model, labels, seed=MONTAGE_SEED, batch_size=len(labels), device=state.device,
                               precision=state.precision)
        save_montage(images, labels.tolist(), self.class_names, run.montage_path(state.iteration),
                     title=f"{self.title} iteration {state.iteration}", reference=self.reference,
                     reference_labels=self.reference_labels)


@dataclass
class SamplePrior:
    """Fits the fitted code prior (`sample_prior: fitted`) of the raw and of the EMA model to their own codes of the
    training volumes (vae: the posterior means; alpha-gan: E(x)), before each montage and checkpoint, so what is
    sampled or saved samples where the current codes lie; once, the fitted intensity distribution
    (`match_intensities`) to the training volumes; and then each time the gain of its edge detail
    (`intensity_sharpen`) to `gain_per_class` raw samples per class of the EMA model, the same gain for both. A no-op
    for models without any of these."""

    images: torch.Tensor
    labels: torch.Tensor
    batch_size: int = 16
    gain_per_class: int = 16  # 4 per class: gains 0.83 where 20 give 0.65 (the draws' own spread)

    def __call__(self, state: TrainState) -> None:
        # a DistributedDataParallel wrapper: its module
        models = [getattr(m, "module", m) for m in {id(m): m for m in (state.model, state.infer_model)}.values()]
        for model in models:
            intensities = getattr(model, "intensity_prior", None)
            if intensities is not None and not bool(intensities.fitted):  # the data do not change: fit once
                intensities.fit(self.images, self.labels)
            prior = getattr(model, "code_prior", None)
            if prior is not None:
                prior.fit(encode(model, self.images, self.labels, batch_size=self.batch_size, device=state.device),
                          self.labels)
        infer = models[-1]
        intensities = getattr(infer, "intensity_prior", None)
        if intensities is not None and intensities.sharpen:  # fitted on the EMA model's samples, used by both
            gain = self.fit_gain(infer, intensities, state)
            for model in models:
                model.intensity_prior.gain.fill_(gain)

    def fit_gain(self, model: nn.Module, intensities: nn.Module, state: TrainState) -> float:
        """The detail gain fitted to raw samples (a fixed seed) of every class present."""
        labels = torch.unique(self.labels).repeat_interleave(self.gain_per_class)
        raw = sample_images(model, labels, seed=GAIN_SEED, batch_size=self.batch_size, device=state.device,
                            precision=state.precision, match=False)
        return intensities.fit_gain(raw, labels)


def reference_images(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, list[int]]:
    """The first image of each class present (the real reference row of the montages): ([K, C, *S], labels)."""
    picks = [int(torch.nonzero(labels == k)[0]) for k in range(num_classes) if bool((labels == k).any())]
    return images[picks].clone(), [int(labels[i]) for i in picks]


@dataclass
class LossCurve:
    """loss.png in the run folder: every logged value of log.csv against the iteration, redrawn every `every`
    iterations (0: only at the end) and at the end, so it follows a running training."""

    every: int
    title: str

    def due(self, iteration: int, done: bool) -> bool:
        return done or bool(self.every and iteration % self.every == 0)

    def __call__(self, run: RunDir, history: list[dict[str, Any]]) -> None:
        if run.main:
            save_loss_curves(history, run.loss_curve_path, title=f"{self.title}: log.csv")


TENSORBOARD_DIR = "tensorboard"


def require_tensorboard() -> None:
    """One clear error when train.tensorboard is asked for but the tensorboard package is missing."""
    if importlib.util.find_spec("tensorboard") is None:
        raise MedgenError("train.tensorboard (--tensorboard) needs the tensorboard package: "
                          "pip install 'medgen[tensorboard]'")


@dataclass
class TensorBoard:
    """TensorBoard event files in RUN/tensorboard: every logged row's training values (`train/NAME`: the losses)
    and validation metrics (`val/NAME`) against the iteration, and each sample montage (`samples`, the PNG the
    Montage hook wrote).

    Args:
        folder: the event-file folder.
        purge_step: on resume, the first iteration to log again (TensorBoard drops older events from there on).
    """

    folder: Path
    purge_step: int | None = None
    writer: Any = field(default=None, init=False)

    def __post_init__(self) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter  # heavy and optional: only when asked for

        self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=self.purge_step)

    def scalars(self, row: dict[str, Any]) -> None:
        it = int(row["iteration"])
        for key, value in row.items():
            if key in ("iteration", "seconds") or not isinstance(value, (int, float)):
                continue
            tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
            self.writer.add_scalar(tag, float(value), it)
        self.writer.flush()

    def image(self, png: Path, iteration: int) -> None:
        if not png.is_file():
            return
        with Image.open(png) as im:
            pixels = np.asarray(im.convert("RGB"))  # [H, W, 3] uint8
        self.writer.add_image("samples", pixels, iteration, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
