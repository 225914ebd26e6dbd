"""What fit() does between iterations besides stepping: validation (and best.pt), sample montages (with a real
reference row per class) and the loss-curve picture of log.csv."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medgen.errors import MedgenError
from medgen.models.sampling import can_sample, sample_images
from medgen.training.run_dir import RunDir
from medgen.training.state import TrainState
from medgen.viz import save_loss_curves, save_montage

MONTAGE_SEED = 1234
MONTAGE_PER_CLASS = 2


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
