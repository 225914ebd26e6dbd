"""TrainState: everything the next iteration depends on, and its bit-exact round trip through a checkpoint.

Model, Step, optimizers, grad scalers, EMA, the three RNG streams (global torch, Step noise, augmentation)
and the batch order. `state_dict()` / `rng_state()` go into last.pt; `load_checkpoint()` restores them, so a
resumed run continues bit-exactly.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from medgen.checkpoint import build_checkpoint, load_model_state, nonfinite_weights, to_plain
from medgen.console import log
from medgen.data.dataset import ImageSet
from medgen.errors import MedgenError
from medgen.runtime import Precision
from medgen.training import distributed
from medgen.training.ema import EMA
from medgen.training.steps import Batch, Step, StepContext

# Settings a resumed run may change: how long it runs and how often it reports (not what it computes).
RESUME_MAY_CHANGE = {"device", "train.iterations", "train.max_seconds", "train.log_every", "train.sample_every",
                     "train.checkpoint_every", "train.progress_every", "train.tensorboard", "data.path", "data.cache",
                     "data.image_column", "data.label_column", "data.group_column", "phantom.cache_dir"}


def data_fingerprint(data: ImageSet) -> str:
    """sha256 over the images (a strided sample), labels, subjects and class names: same data, same string."""
    h = hashlib.sha256()
    h.update(repr((tuple(data.images.shape), list(data.class_names), list(data.subjects))).encode())
    h.update(data.labels.numpy().tobytes())
    flat = data.images.reshape(-1)
    h.update(flat[:: max(1, flat.numel() // 1_000_003)].float().numpy().tobytes())
    return h.hexdigest()[:16]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def check_resume(ckpt: dict[str, Any], cfg_dict: dict[str, Any], seed: int, fingerprint: str, path: Any) -> None:
    """Refuse to resume a run with other data, another seed or another config than it was started with."""
    extra = ckpt.get("extra", {})
    old_seed = extra.get("seed", ckpt.get("config", {}).get("seed"))
    if old_seed is not None and int(old_seed) != int(seed):
        raise MedgenError(f"{path}: the run was started with seed {old_seed}, not {seed}; resume with the same "
                          "seed or start a new --out")
    if extra.get("data_fingerprint") not in (None, fingerprint):
        raise MedgenError(f"{path}: the run was trained on other data (fingerprint {extra['data_fingerprint']}, "
                          f"now {fingerprint}); resume with the same --data or start a new --out")
    old, new = _flatten(to_plain(ckpt.get("config") or {})), _flatten(to_plain(cfg_dict))
    diff = sorted(k for k in set(old) | set(new) if k not in RESUME_MAY_CHANGE and old.get(k) != new.get(k))
    if old and diff:
        raise MedgenError(f"{path}: the run was started with a different config ({', '.join(diff[:4])}"
                          f"{' ...' if len(diff) > 4 else ''} differ); resume with the same config or start a new --out")


class BatchOrder:
    """Seeded per-epoch shuffling; its state (generator, permutation, position) lives in checkpoints.

    Args:
        n: number of items.
        batch_size: items per batch (capped at n); the remainder of an epoch is dropped.
        seed: seed of the order's own generator.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n = n
        self.batch_size = min(batch_size, n)
        self.generator = torch.Generator().manual_seed(seed)
        self.perm = torch.empty(0, dtype=torch.int64)
        self.pos = 0

    def next(self) -> torch.Tensor:
        """Indices of the next batch."""
        if self.pos + self.batch_size > self.perm.numel():
            self.perm = torch.randperm(self.n, generator=self.generator)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "perm": self.perm.clone(), "pos": self.pos}

    def load(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.perm = state["perm"].clone()
        self.pos = int(state["pos"])


class TrainState:
    """The live training state of one run.

    Args:
        model_name: registry name (written into checkpoints).
        model: the prepared model (on the device; the unwrapped module that is saved, averaged and sampled).
        kwargs: its constructor kwargs; step_kwargs: the Step's hyper-parameters.
        step: the model's Step.
        lr: learning rate of the Step's optimizers; ema_decay: 0 for no EMA.
        precision: the one AMP path.
        device: the training device.
        n_items, batch_size, seed: the batch order's size and seeding (Step noise: seed + 1,
            augmentation: seed + 2).
        total_iterations: planned length of the run (for schedules).
        rank, world: this process in a data-parallel run.
        fingerprint: data_fingerprint of the training data (recorded in checkpoints; resume checks it).
    """

    def __init__(self, model_name: str, model: nn.Module, kwargs: dict[str, Any], step_kwargs: dict[str, Any],
                 step: Step, *, lr: float, ema_decay: float, precision: Precision, device: torch.device,
                 n_items: int, batch_size: int, seed: int, total_iterations: int, rank: int = 0,
                 world: int = 1, fingerprint: str = "") -> None:
        self.model_name, self.model, self.kwargs, self.step_kwargs, self.step = model_name, model, kwargs, step_kwargs, step
        self.device, self.precision, self.rank, self.world = device, precision, rank, world
        self.seed, self.fingerprint = seed, fingerprint
        self.optimizers = step.optimizers(model, lr)
        self.scalers = {name: precision.make_scaler() for name in self.optimizers}
        self.ema = EMA(model, ema_decay) if ema_decay > 0 else None
        self.order = BatchOrder(n_items, batch_size, seed)
        self.step_gen = torch.Generator(device=device).manual_seed(seed + 1)
        self.aug_gen = torch.Generator().manual_seed(seed + 2)
        self.ctx = StepContext(precision=precision, generator=self.step_gen, iteration=0,
                               total_iterations=total_iterations, scalers=self.scalers,
                               grad_sync=distributed.average_gradients if world > 1 else None, rank=rank,
                               world_size=world)
        self.iteration = 0  # completed iterations
        self.seconds_before = 0.0  # training seconds of earlier sessions of a resumed run
        self.best_value = -math.inf  # best validation select_metric so far

    @property
    def infer_model(self) -> nn.Module:
        """The model validation and montages use: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def train_step(self, data: ImageSet, transform: Callable[[Batch, torch.Generator], Batch] | None,
                   good_checkpoint: Any) -> dict[str, float]:
        """One iteration: this rank's batch, augmentation, the Step, a finiteness check, the EMA update.

        Returns the losses averaged over the global batch.
        """
        it = self.iteration
        idx = distributed.shard(self.order.next(), self.rank, self.world)  # this rank's share of the global batch
        batch = Batch(images=data.images[idx], labels=data.labels[idx])
        if transform is not None:
            batch = transform(batch, self.aug_gen)
        batch = Batch(images=batch.images.to(self.device, non_blocking=True),
                      labels=batch.labels.to(self.device, non_blocking=True))
        self.ctx.iteration = it
        losses = self.step(self.model, batch, self.optimizers, self.ctx)
        values = distributed.reduce_losses({k: float(v) for k, v in losses.items()})  # global-batch means
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            kind = "NaN" if math.isnan(values[bad[0]]) else "infinite"
            where = str(good_checkpoint) if good_checkpoint is not None else "none (no checkpoint written yet)"
            what = bad[0] if "loss" in bad[0] else f"loss {bad[0]}"
            raise MedgenError(f"{what} became {kind} at iteration {it + 1}; last good checkpoint: {where} "
                              "(lower train.lr?)")
        if self.ema is not None:
            self.ema.update(self.model)
        self.iteration = it + 1
        return values

    def check_finite_weights(self, good_checkpoint: Any) -> None:
        """Stop with one line when the weights (or their EMA) hold NaN/Inf, naming the last good checkpoint."""
        bad = nonfinite_weights({"model": self.model.state_dict(),
                                 "ema": self.ema.state_dict() if self.ema is not None else None})
        if bad:
            where = str(good_checkpoint) if good_checkpoint is not None else "none (no checkpoint written yet)"
            raise MedgenError(f"the weights became non-finite by iteration {self.iteration} ({len(bad)} tensors, "
                              f"e.g. {bad[0]}; lower train.lr?); last good checkpoint: {where}")

    def rng_state(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state(), "step": self.step_gen.get_state().cpu(),
                 "augment": self.aug_gen.get_state(), "order": self.order.state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "scalers": {n: s.state_dict() for n, s in self.scalers.items()},
        }

    def checkpoint(self, data: ImageSet, config: dict[str, Any], seconds: float) -> dict[str, Any]:
        """The self-describing checkpoint of the state after `self.iteration` iterations."""
        return build_checkpoint(
            model_name=self.model_name, kwargs=self.kwargs, step_kwargs=self.step_kwargs,
            class_names=data.class_names, affine=data.affine, normalisation=data.normalisation,
            state=self.state_dict(), step=self.iteration, rng=self.rng_state(), config=config,
            extra={"seconds": seconds, "data_fingerprint": self.fingerprint, "seed": self.seed,
                   "subjects": sorted(set(data.subjects)),  # who trained it: later evaluations leave them out
                   "ema_updates": self.ema.num_updates if self.ema is not None else 0,
                   "best_value": self.best_value if math.isfinite(self.best_value) else None},
        )

    def load_checkpoint(self, ckpt: dict[str, Any], where: str) -> None:
        """Restore everything from a checkpoint written by `checkpoint()` (the load_state_dict of resume)."""
        state = ckpt["state"]
        load_model_state(self.model, state["model"], f"checkpoint {where}")
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"], ckpt["extra"].get("ema_updates", ckpt["step"]))
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        for name, sc in self.scalers.items():
            if name in state.get("scalers", {}) and state["scalers"][name]:
                sc.load_state_dict(state["scalers"][name])
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.step_gen.set_state(rng["step"].to(self.step_gen.get_state().device))
        self.aug_gen.set_state(rng["augment"])
        self.order.load(rng["order"])
        self.iteration = int(ckpt["step"])
        self.seconds_before = float(ckpt["extra"].get("seconds", 0.0))
        saved_best = ckpt["extra"].get("best_value")
        self.best_value = float(saved_best) if saved_best is not None else -math.inf
        log(f"resuming {self.model_name} from {where} at iteration {self.iteration}")
