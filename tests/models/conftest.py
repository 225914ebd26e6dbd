"""Fixtures of the model tests."""

from __future__ import annotations

import pytest
import torch

from medgen.config import TrainConfig
from medgen.data.dataset import ImageSet
from medgen.training.loop import fit


@pytest.fixture
def tiny_fit(tmp_path):
    """fit(name, **model_kwargs) -> the trained model's state dict: 3 iterations on 12 random 16^3 volumes."""

    def run(name: str, **model_kwargs) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(4)
        images = torch.rand(12, 1, 16, 16, 16, generator=g) * 2 - 1
        data = ImageSet(images=images, labels=torch.arange(12) % 3, subjects=[f"s{i}" for i in range(12)],
                        class_names=["CN", "MCI", "AD"])
        train = TrainConfig(iterations=3, batch_size=4, ema_decay=0.0, precision="fp32", log_every=1,
                            sample_every=0, checkpoint_every=0)
        r = fit(name, data, tmp_path / name, train=train, device="cpu", seed=0, model_kwargs=model_kwargs)
        return torch.load(r.checkpoint, weights_only=True)["state"]["model"]

    return run
