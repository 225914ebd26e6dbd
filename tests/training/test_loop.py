"""The one training loop: run folder, resume bit-exactness, NaN stop, validation, time budget.

A tiny dummy model and Step are registered here so the loop is tested independently of the real models.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from medgen.checkpoint import load_checkpoint, model_from_checkpoint
from medgen.config import TrainConfig
from medgen.data.dataset import ImageSet
from medgen.errors import MedgenError
from medgen.models.registry import _MODELS, register_model
from medgen.training.loop import fit
from medgen.training.steps import Batch, Step, StepContext, register_step
from medgen.training.steps.base import _STEPS

NAME = "test-dummy-gen"


class DummyGen(nn.Module):
    """A conditional linear decoder with a dropout (uses the global RNG) and a BatchNorm buffer."""

    def __init__(self, *, spatial_dims: int = 3, in_channels: int = 1, num_classes: int = 3,
                 image_size: int = 8, latent_dim: int = 4) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.shape = (in_channels,) + (image_size,) * spatial_dims
        self.embed = nn.Embedding(num_classes, latent_dim)
        self.norm = nn.BatchNorm1d(latent_dim)
        self.drop = nn.Dropout(0.1)
        self.out = nn.Linear(latent_dim, int(np.prod(self.shape)))

    def sample(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.norm(z + self.embed(labels)))
        return torch.tanh(self.out(h)).view(-1, *self.shape)  # [B, C, *spatial]


@dataclass
class DummyStep(Step):
    nan_at: int = -1

    def optimizers(self, model: nn.Module, lr: float) -> dict[str, torch.optim.Optimizer]:
        return {"g": torch.optim.Adam(model.parameters(), lr=lr)}

    def __call__(self, model: nn.Module, batch: Batch, opt: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        z = ctx.randn(batch.images.shape[0], model.latent_dim, device=batch.images.device)
        with ctx.precision.autocast():
            loss = (model.sample(z, batch.labels) - batch.images).pow(2).mean()
        if ctx.iteration == self.nan_at:
            loss = loss * float("nan")
        ctx.backward_step(loss, opt["g"], "g")
        return {"mse": loss.detach()}


@pytest.fixture(autouse=True, scope="module")
def registered_dummy():
    """The dummy model is registered for these tests only: the model checklist walks the real registry."""
    added = NAME not in _MODELS
    if added:
        register_model(NAME)(DummyGen)
        register_step(NAME)(DummyStep)
    yield
    if added:
        _MODELS.pop(NAME, None)
        _STEPS.pop(NAME, None)


def tiny_data(n: int = 12, size: int = 8, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.rand(n, 1, size, size, size, generator=g) * 2 - 1
    images += labels.view(-1, 1, 1, 1, 1) * 0.1
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = [-90, -126, -72]
    return ImageSet(images=images.clamp(-1, 1), labels=labels, subjects=[f"s{i}" for i in range(n)],
                    class_names=["CN", "MCI", "AD"], affine=affine, normalisation={"method": "test", "p": 99.5})


def cfg(**kw) -> TrainConfig:
    base = dict(iterations=8, batch_size=4, lr=1e-2, ema_decay=0.9, precision="fp32", log_every=2,
                sample_every=0, checkpoint_every=3)
    base.update(kw)
    return TrainConfig(**base)


def run(out, **kw):
    train = kw.pop("train", cfg())
    return fit(NAME, kw.pop("data", tiny_data()), out, model_kwargs={"latent_dim": 4}, step_kwargs=kw.pop("step_kwargs", {}),
               train=train, device="cpu", seed=kw.pop("seed", 3), **kw)


def state_of(path):
    return load_checkpoint(path)["state"]


def test_run_folder_contents(tmp_path):
    res = run(tmp_path / "run", train=cfg(sample_every=4))
    out = tmp_path / "run"
    for name in ("config.yaml", "log.csv", "last.pt", "final.pt", "loss.png"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["iter_000004.png", "iter_000008.png"]
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["iteration"]) for r in rows] == [2, 4, 6, 8]
    assert set(rows[0]) == {"iteration", "seconds", "mse"}
    assert res.iterations == 8 and res.checkpoint == out / "final.pt" and res.best is None
    ck = load_checkpoint(res.checkpoint)
    assert ck["model"] == NAME and ck["step"] == 8
    assert ck["kwargs"]["num_classes"] == 3 and ck["kwargs"]["image_size"] == 8 and ck["kwargs"]["spatial_dims"] == 3
    assert ck["affine"].dtype == torch.float64 and ck["affine"][0, 3] == -90
    assert ck["class_names"] == ["CN", "MCI", "AD"] and ck["normalisation"]["p"] == 99.5


def test_refuses_existing_folder_unless_overwrite(tmp_path):
    run(tmp_path / "run", train=cfg(iterations=2))
    with pytest.raises(MedgenError, match="already exists"):
        run(tmp_path / "run", train=cfg(iterations=2))
    res = run(tmp_path / "run", train=cfg(iterations=3), overwrite=True)
    assert res.iterations == 3


class Crash(Exception):
    pass


def test_resume_equals_uninterrupted(tmp_path):
    full = run(tmp_path / "full")
    calls = []

    def crash_at_5(batch, g):  # identity augmentation that "kills" the run in iteration 5
        calls.append(1)
        if len(calls) == 5:
            raise Crash
        return batch

    crash = tmp_path / "crash"
    with pytest.raises(Crash):
        run(crash, transform=crash_at_5)
    assert load_checkpoint(crash / "last.pt")["step"] == 3 and not (crash / "final.pt").exists()
    resumed = run(crash, resume=True)
    assert resumed.iterations == 8
    a, b = state_of(full.checkpoint), state_of(resumed.checkpoint)
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    ma, mb = a["optimizers"]["g"]["state"], b["optimizers"]["g"]["state"]
    assert all(torch.equal(ma[i]["exp_avg"], mb[i]["exp_avg"]) for i in ma)
    rows = [int(r["iteration"]) for r in csv.DictReader(open(crash / "log.csv"))]
    assert rows == [2, 4, 6, 8]
    # resuming a finished run continues a longer schedule from it
    more = run(tmp_path / "full", train=cfg(iterations=10), resume=True)
    assert more.iterations == 10


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(MedgenError, match=r"loss mse became NaN at iteration 6; last good checkpoint: .*last\.pt"):
        run(out, step_kwargs={"nan_at": 5})
    assert not (out / "final.pt").exists()
    model, meta = model_from_checkpoint(out / "last.pt")
    assert meta["step"] == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_validation_writes_best_and_time_budget(tmp_path):
    calls = []

    def validate(model):
        assert not model.training
        calls.append(1)
        return {"score": [0.1, 0.5, 0.3, 0.2][len(calls) - 1]}

    res = run(tmp_path / "run", validate=validate, validate_every=2, select_metric="score")
    assert len(calls) == 4 and res.best == tmp_path / "run" / "best.pt"
    assert load_checkpoint(res.best)["step"] == 4
    assert [r.get("val_score") for r in res.history] == [0.1, 0.5, 0.3, 0.2]
    res = run(tmp_path / "t", train=cfg(iterations=1000, max_seconds=0.0))
    assert res.stopped_by_time and res.iterations == 1 and res.checkpoint.is_file()


def test_transform_is_applied_with_generator(tmp_path):
    seen = []

    def transform(batch, g):
        assert isinstance(g, torch.Generator)
        seen.append(batch.images.shape[0])
        return Batch(images=torch.flip(batch.images, dims=[-1]), labels=batch.labels)

    run(tmp_path / "run", train=cfg(iterations=3), transform=transform)
    assert seen == [4, 4, 4]


def test_model_kwargs_contradicting_data_is_an_error(tmp_path):
    with pytest.raises(MedgenError, match="image_size"):
        fit(NAME, tiny_data(), tmp_path / "r", model_kwargs={"image_size": 16}, train=cfg(), device="cpu")


def test_2d_data_gives_an_image_grid_montage(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = ImageSet(images=torch.rand(6, 1, 8, 8, generator=g) * 2 - 1, labels=torch.arange(6) % 3,
                    subjects=[str(i) for i in range(6)], class_names=["a", "b", "c"])
    res = run(tmp_path / "run", data=data, train=cfg(iterations=2, sample_every=2))
    assert (tmp_path / "run" / "samples" / "iter_000002.png").stat().st_size > 0
    assert load_checkpoint(res.checkpoint)["affine"] is None
