"""Helpers the adversarial Steps share: freezing a network for a block, uniform noise from the step's stream."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from medgen.training.steps.base import StepContext


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Turn off requires_grad of the modules' parameters for the block (no wasted weight gradients),
    restoring the previous flags after."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def uniform(ctx: StepContext, n: int, device: torch.device) -> torch.Tensor:
    """n draws from U(0, 1) through ctx.randn (Phi of a standard normal is uniform), so data-parallel
    ranks take their share of one global draw like all other noise."""
    return torch.special.ndtr(ctx.randn(n, device=device))
