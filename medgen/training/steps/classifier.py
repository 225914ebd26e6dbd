"""Training step of the classifier: cross-entropy (optional label smoothing), AdamW, optional cosine schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from medgen.models.classifier import Classifier
from medgen.training.steps.base import Batch, Step, StepContext, register_step


@register_step(Classifier)
@dataclass
class ClassifierStep(Step):
    """One supervised step.

    Args:
        label_smoothing: cross-entropy label smoothing in [0, 1).
        weight_decay: AdamW weight decay.
        schedule: learning rate over the run: constant, or cosine decay to zero after a linear warm-up.
        warmup: share of the run spent warming up (cosine only).
    """

    label_smoothing: float = 0.0
    weight_decay: float = 1e-4
    schedule: Literal["constant", "cosine"] = "constant"
    warmup: float = 0.05

    def optimizers(self, model: nn.Module, lr: float) -> dict[str, torch.optim.Optimizer]:
        return {"classifier": torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=self.weight_decay)}

    def lr_factor(self, iteration: int, total: int) -> float:
        """Multiplier of the base learning rate at `iteration` (a pure function: resume stays exact)."""
        if self.schedule == "constant":
            return 1.0
        t = iteration / max(total, 1)
        if t < self.warmup:
            return (iteration + 1) / max(self.warmup * total, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * (t - self.warmup) / max(1.0 - self.warmup, 1e-8)))

    def __call__(self, model: nn.Module, batch: Batch, opt: dict[str, torch.optim.Optimizer],
                 ctx: StepContext) -> dict[str, torch.Tensor]:
        model.train()
        factor = self.lr_factor(ctx.iteration, ctx.total_iterations)
        for group in opt["classifier"].param_groups:
            group.setdefault("base_lr", group["lr"])  # saved with the optimizer state
            group["lr"] = group["base_lr"] * factor
        with ctx.precision.autocast():
            out = model(batch.images)
        # Loss in fp32 whatever the autocast dtype.
        loss = F.cross_entropy(out.logits.float(), batch.labels, label_smoothing=self.label_smoothing)
        ctx.backward_step(loss, opt["classifier"], "classifier")
        acc = (out.logits.detach().argmax(1) == batch.labels).float().mean()
        return {"loss": loss.detach(), "acc": acc}
