"""Training step of the classifier: cross-entropy (optional label smoothing), AdamW."""

from __future__ import annotations

from dataclasses import dataclass

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
    """

    label_smoothing: float = 0.0
    weight_decay: float = 1e-4

    def optimizers(self, model: nn.Module, lr: float) -> dict[str, torch.optim.Optimizer]:
        return {"classifier": torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=self.weight_decay)}

    def __call__(self, model: nn.Module, batch: Batch, opt: dict[str, torch.optim.Optimizer],
                 ctx: StepContext) -> dict[str, torch.Tensor]:
        model.train()
        with ctx.precision.autocast():
            out = model(batch.images)
        # Loss in fp32 whatever the autocast dtype.
        loss = F.cross_entropy(out.logits.float(), batch.labels, label_smoothing=self.label_smoothing)
        ctx.backward_step(loss, opt["classifier"], "classifier")
        acc = (out.logits.detach().argmax(1) == batch.labels).float().mean()
        return {"loss": loss.detach(), "acc": acc}
