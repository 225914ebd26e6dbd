"""Exponential moving average of a model's weights (used for sampling and montages).

Written by hand rather than with torch.optim.swa_utils.AveragedModel so that the EMA state dict has
exactly the model's keys and a checkpoint's "ema" entry loads straight into a freshly built model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """EMA copy of a model: floating-point parameters averaged, buffers (e.g. BatchNorm stats) copied.

    Args:
        model: the model being trained (not modified).
        decay: target decay; the effective decay warms up as min(decay, (1 + n) / (10 + n)) so short
            runs still give a useful average.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        self.decay = float(decay)
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step toward `model`'s current weights."""
        d = self.current_decay()
        ema_params = dict(self.module.named_parameters())
        pairs = [(ema_params[name], p) for name, p in model.named_parameters() if p.is_floating_point()]
        if pairs:
            torch._foreach_lerp_([e for e, _ in pairs], [p.detach() for _, p in pairs], 1.0 - d)
        ema_buffers = dict(self.module.named_buffers())
        for name, b in model.named_buffers():
            ema_buffers[name].copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged model's state dict (same keys as the model)."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        self.module.load_state_dict(state)
        self.num_updates = int(num_updates)
