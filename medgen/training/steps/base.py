"""The Step protocol and its registry: Batch, StepContext, Step, register_step, step_class, create_step.

One Step per model: the model-specific part of an iteration; the loop (training/loop.py) does the rest.

A Step is a dataclass whose typed fields are its loss hyper-parameters (config section
`steps.<model name>`). It builds the model's optimizers and runs one iteration: forward passes under
`ctx.precision.autocast()`, backward and optimizer steps through `ctx.backward_step`, and returns
detached scalar losses by name (logged to the CSV and the progress bar).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from medgen.errors import MedgenError
from medgen.models.registry import check_kwargs, get_model_class
from medgen.runtime import Precision


@dataclass
class Batch:
    """A batch on the training device: images [B, C, *spatial] in [-1, 1], labels [B] int64."""

    images: torch.Tensor
    labels: torch.Tensor


@dataclass
class StepContext:
    """What a Step needs from the loop besides the model and the batch.

    Attributes:
        precision: autocast settings (the one AMP path).
        generator: seeded torch.Generator on the training device, for all noise a Step draws.
        iteration: 0-based index of the current iteration.
        total_iterations: planned length of the run (for schedules such as KL warm-up).
        scalers: one GradScaler per optimizer name (only active for fp16).
        grad_sync: called with each optimizer after backward and before its step (data-parallel
            gradient averaging, medgen.training.distributed.average_gradients); None in one process.
        rank, world_size: this process's share of the global batch (data-parallel runs).
    """

    precision: Precision
    generator: torch.Generator
    iteration: int = 0
    total_iterations: int = 1
    scalers: dict[str, torch.amp.GradScaler] = field(default_factory=dict)
    grad_sync: Callable[[torch.optim.Optimizer], None] | None = None
    rank: int = 0
    world_size: int = 1

    def backward_step(self, loss: torch.Tensor, opt: torch.optim.Optimizer, name: str,
                      retain_graph: bool = False) -> None:
        """zero_grad, backward (scaled for fp16), optimizer step and scaler update for one optimizer."""
        scaler = self.scalers.get(name)
        opt.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward(retain_graph=retain_graph)
            if self.grad_sync is not None:
                self.grad_sync(opt)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward(retain_graph=retain_graph)
            if self.grad_sync is not None:
                self.grad_sync(opt)
            opt.step()

    def randn(self, *shape: int, device: torch.device) -> torch.Tensor:
        """Standard normal noise from the context's generator.

        In a data-parallel run the first dimension is this rank's batch: the global batch's noise is drawn
        (same generator state on every rank) and this rank's rows returned, as in a single-process run.
        """
        if self.world_size > 1 and shape:
            full = torch.randn(shape[0] * self.world_size, *shape[1:], generator=self.generator, device=device)
            return full[self.rank * shape[0]:(self.rank + 1) * shape[0]]
        return torch.randn(*shape, generator=self.generator, device=device)

    def rand(self, *shape: int, device: torch.device) -> torch.Tensor:
        """Uniform [0, 1) noise from the context's generator (this rank's rows, as randn)."""
        if self.world_size > 1 and shape:
            full = torch.rand(shape[0] * self.world_size, *shape[1:], generator=self.generator, device=device)
            return full[self.rank * shape[0]:(self.rank + 1) * shape[0]]
        return torch.rand(*shape, generator=self.generator, device=device)


class Step:
    """Base class of the per-model Steps (subclasses are dataclasses)."""

    def optimizers(self, model: nn.Module, lr: float) -> dict[str, torch.optim.Optimizer]:
        """Build the optimizers, keyed by name (saved and restored by name in checkpoints)."""
        raise NotImplementedError

    def __call__(self, model: nn.Module, batch: Batch, opt: dict[str, torch.optim.Optimizer],
                 ctx: StepContext) -> dict[str, torch.Tensor]:
        """Run one iteration; return detached scalar losses by name."""
        raise NotImplementedError


_STEPS: dict[str, type[Step]] = {}


def register_step(model: str | type[nn.Module]) -> Callable[[type[Step]], type[Step]]:
    """Class decorator: the Step that trains `model` (a registered model class, or its registry name).

    Steps are keyed by the model registry's names, so the model registry stays the one list of models.
    """
    name = model if isinstance(model, str) else model.registry_name  # type: ignore[attr-defined]

    def deco(cls: type[Step]) -> type[Step]:
        _STEPS[name] = cls
        return cls

    return deco


def step_class(name: str) -> type[Step] | None:
    """The Step class registered for model `name`, or None (importing medgen.training.steps registers all)."""
    return _STEPS.get(name)


def check_step_kwargs(name: str, kwargs: dict[str, Any], what: str | None = None) -> type[Step]:
    """The Step class for model `name` after checking `kwargs` against its fields; `what` names the
    config section in errors (default `steps.<name>`)."""
    what = what or f"steps.{name}"
    get_model_class(name)  # an unknown model name -> the registry's did-you-mean error
    if name not in _STEPS:
        raise MedgenError(f"{what}: no training step for model {name!r}; known: {', '.join(sorted(_STEPS))}")
    cls = _STEPS[name]
    names = [f.name for f in dataclasses.fields(cls)]
    for key in kwargs:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (takes: {', '.join(names)})"
            raise MedgenError(f"{what}: unknown key {key!r}{hint}")
    check_kwargs(cls.__init__, kwargs, what)
    return cls


def create_step(name: str, **kwargs: Any) -> Step:
    """Build the Step for model `name` from its hyper-parameters (config `steps.<name>`)."""
    return check_step_kwargs(name, kwargs)(**kwargs)
