"""The one training loop for every model: a Step per model does the model-specific part.

fit() builds the model and its Step, then per iteration: draws a batch (own seeded order, resumable),
applies the optional augmentation, calls the Step, checks the losses are finite, updates the EMA, logs,
writes montages, checkpoints and runs validation. Everything the next iteration depends on is in
`last.pt`, so `resume=True` continues bit-exactly.

Run folder:
    config.yaml   the resolved config
    log.csv       iteration, seconds, one column per loss
    samples/      montages iter_NNNNNN.png (EMA samples, fixed seed)
    last.pt       latest checkpoint (every train.checkpoint_every iterations and at the end; --resume reads it)
    final.pt      the checkpoint at the end of the run (what synth/evaluate use for a run folder)
    best.pt       with validation: the checkpoint with the best select_metric
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from medgen.config import TrainConfig
from medgen.console import log, make_progress
from medgen.data.dataset import ImageSet
from medgen.errors import MedgenError
from medgen.outputs import atomic_write_text, check_output_dir, clear_output_dir, make_output_dir
from medgen.runtime import (
    bf16_channels_last_hazards,
    compile_model,
    configure_backends,
    default_channels_last,
    default_space_to_depth,
    resolve_device,
    resolve_precision,
    to_channels_last,
    use_space_to_depth_stems,
)
from medgen.training import distributed
from medgen.training.checkpoint import (
    BEST_NAME,
    FINAL_NAME,
    LAST_NAME,
    build_checkpoint,
    load_checkpoint,
    load_model_state,
    nonfinite_weights,
    save_checkpoint,
    to_plain,
)
from medgen.training.ema import EMA
from medgen.training.steps import Batch, StepContext, create_step

MONTAGE_SEED = 1234
MONTAGE_PER_CLASS = 2


@dataclass
class FitResult:
    """What a training run produced.

    Attributes:
        checkpoint: the final checkpoint (final.pt).
        best: best.pt when validation selected one, else None.
        history: logged rows (iteration, seconds, losses, validation metrics).
        seconds: total training seconds (across resumes).
        iterations: completed iterations.
        run_dir: the run folder.
        stopped_by_time: True when train.max_seconds ended the run early.
    """

    checkpoint: Path
    best: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    iterations: int = 0
    run_dir: Path | None = None
    stopped_by_time: bool = False


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


def fill_model_kwargs(model_name: str, model_kwargs: dict[str, Any], data: ImageSet) -> dict[str, Any]:
    """Fill num_classes, spatial_dims, in_channels, image_size from the data where the model takes them.

    A given value that contradicts the data is an error (a wrong size would fail later, less clearly).
    """
    from medgen.models.registry import model_defaults

    takes = model_defaults(model_name)
    from_data = {
        "num_classes": len(data.class_names),
        "spatial_dims": data.spatial_dims,
        "in_channels": int(data.images.shape[1]),
        "image_size": int(data.images.shape[2]),
    }
    kwargs = dict(model_kwargs)
    for key, value in from_data.items():
        if key not in takes:
            continue
        if key in kwargs and kwargs[key] is not None and kwargs[key] != value:
            raise MedgenError(f"models.{model_name}.{key} is {kwargs[key]} but the data has {key} {value}")
        kwargs[key] = value
    return kwargs


def prepare_model(model: nn.Module, train: TrainConfig, device: torch.device) -> nn.Module:
    """Move to the device, set the memory format and compile submodules (in place; state-dict keys unchanged).

    Defaults per device come from medgen.runtime (channels_last_3d with bf16 on CPU and on CUDA,
    space-to-depth input convs on CPU, cudnn.benchmark on CUDA). In a data-parallel run (torchrun) BatchNorm becomes SyncBatchNorm on CUDA
    and rank 0's weights are copied to every rank; gradients are averaged in StepContext.backward_step.
    """
    model = distributed.sync_batchnorm(model, device)
    model.to(device)
    configure_backends(device)
    channels_last = train.channels_last
    if channels_last is None:
        channels_last = default_channels_last(device)
        if channels_last and device.type == "cpu" and resolve_precision(train.precision, device).name == "bf16":
            # oneDNN's bf16 channels_last weight gradient is wrong for padded convs on 1-2 voxel maps
            hazards = bf16_channels_last_hazards(model)
            if hazards:
                log(f"channels_last off: bf16 weight gradients of {', '.join(hazards[:3])} are unreliable in it")
                channels_last = False
    if channels_last:
        to_channels_last(model)
    if default_space_to_depth(device):
        use_space_to_depth_stems(model)  # same weights and results, faster 1-channel input convs
    distributed.broadcast_model(model)
    if train.compile:
        # Compiles the encoder/generator/decoder forwards in place (state-dict keys unchanged); critics stay
        # eager because the gradient penalty needs their double backward, which torch.compile lacks.
        compile_model(model)
    return model


def _sampling_labels(num_classes: int) -> torch.Tensor:
    return torch.arange(num_classes).repeat_interleave(MONTAGE_PER_CLASS)


def can_sample(model: nn.Module) -> bool:
    return hasattr(model, "sample") and hasattr(model, "latent_dim")


# Settings a resumed run may change: how long it runs and how often it reports (not what it computes).
RESUME_MAY_CHANGE = {"device", "train.iterations", "train.max_seconds", "train.log_every", "train.sample_every",
                     "train.checkpoint_every", "data.path", "data.cache", "data.image_column", "data.label_column",
                     "data.group_column", "phantom.cache_dir"}


def data_fingerprint(data: ImageSet) -> str:
    """sha256 over the images (a strided sample), labels, subjects and class names: same data, same string."""
    import hashlib

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


def check_resume(ckpt: dict[str, Any], cfg_dict: dict[str, Any], seed: int, fingerprint: str, path: Path) -> None:
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


def _check_weights(model: nn.Module, ema: EMA | None, iteration: int, good: Path | None) -> None:
    """Stop with one line when the weights (or their EMA) hold NaN/Inf, naming the last good checkpoint."""
    bad = nonfinite_weights({"model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None})
    if bad:
        where = str(good) if good is not None else "none (no checkpoint written yet)"
        raise MedgenError(f"the weights became non-finite by iteration {iteration} ({len(bad)} tensors, e.g. "
                          f"{bad[0]}; lower train.lr?); last good checkpoint: {where}")


def fit(
    model_name: str,
    data: ImageSet,
    out: str | Path,
    *,
    model_kwargs: dict[str, Any] | None = None,
    step_kwargs: dict[str, Any] | None = None,
    train: TrainConfig | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    validate: Callable[[nn.Module], dict[str, float]] | None = None,
    validate_every: int = 0,
    select_metric: str | None = None,
    transform: Callable[[Batch, torch.Generator], Batch] | None = None,
    model: nn.Module | None = None,
    config: dict[str, Any] | None = None,
) -> FitResult:
    """Train a registered model on an ImageSet and write the run folder.

    Args:
        model_name: registry name (also selects the Step).
        data: training images and labels.
        out: run folder (refused when non-empty unless resume or overwrite).
        model_kwargs: model constructor kwargs; num_classes/spatial_dims/in_channels/image_size are
            filled from the data when the model takes them.
        step_kwargs: the Step's hyper-parameters.
        train: loop settings (iterations, batch size, lr, EMA decay, precision, intervals, max_seconds).
        device: "auto" | "cpu" | "cuda" or a torch.device.
        seed: seeds model init, batch order, Step noise and augmentation.
        resume: continue from out/last.pt.
        overwrite: delete an existing run folder's contents first.
        validate: callable(model) -> metrics, called every validate_every iterations and at the end
            with the EMA model (the raw model when train.ema_decay == 0), in eval mode under no_grad.
        validate_every: 0 means only at the end.
        select_metric: metric name (higher is better) whose improvement writes best.pt.
        transform: callable(Batch, generator) -> Batch applied to each CPU batch (augmentation).
        model: an already built model to train instead of create_model(model_name, **model_kwargs).
        config: the resolved run config (plain dict) written to config.yaml and into checkpoints.
    """
    train = train or TrainConfig()
    out = Path(out)
    dev = resolve_device(device) if isinstance(device, str) else device
    dist_info, dev = distributed.init_distributed(dev)  # no-op unless launched by torchrun
    rank, world = dist_info.rank, dist_info.world_size
    main = rank == 0
    if main:
        check_output_dir(out, overwrite=overwrite, resume=resume)
    last_path, final_path, best_path = out / LAST_NAME, out / FINAL_NAME, out / BEST_NAME
    if len(data) == 0:
        raise MedgenError("the training data holds no images")
    if train.iterations < 1 or train.batch_size < 1:
        raise MedgenError("train.iterations and train.batch_size must be at least 1")
    distributed.local_batch_size(min(train.batch_size, len(data)), world)  # the global batch splits evenly
    resuming = resume and last_path.is_file()
    if main and overwrite and not resuming:
        clear_output_dir(out)  # only a folder medgen wrote (check_output_dir refused any other)
    if main:
        make_output_dir(out, "train")
    distributed.barrier()

    precision = resolve_precision(train.precision, dev)

    # Model, Step, optimizers, scalers, EMA.
    torch.manual_seed(seed)
    if model is None:
        kwargs = fill_model_kwargs(model_name, model_kwargs or {}, data)
        from medgen.models.registry import create_model

        model = create_model(model_name, **kwargs)
    else:
        kwargs = dict(getattr(model, "init_kwargs", model_kwargs or {}))
    step_kwargs = dict(step_kwargs or {})
    step = create_step(model_name, **step_kwargs)
    model = prepare_model(model, train, dev)
    raw_model = model  # unwrapped module: the one saved, averaged and sampled
    optimizers = step.optimizers(raw_model, train.lr)
    scalers = {name: precision.make_scaler() for name in optimizers}
    ema = EMA(raw_model, train.ema_decay) if train.ema_decay > 0 else None

    order = BatchOrder(len(data), train.batch_size, seed)
    step_gen = torch.Generator(device=dev).manual_seed(seed + 1)
    aug_gen = torch.Generator().manual_seed(seed + 2)
    ctx = StepContext(precision=precision, generator=step_gen, iteration=0,
                      total_iterations=train.iterations, scalers=scalers,
                      grad_sync=distributed.average_gradients if world > 1 else None, rank=rank, world_size=world)

    cfg_dict = to_plain(config) if config is not None else {
        "seed": seed, "train": dataclasses.asdict(train),
        "models": {model_name: kwargs}, "steps": {model_name: step_kwargs},
    }
    fingerprint = data_fingerprint(data)
    start, elapsed_before, best_value = 0, 0.0, -math.inf
    history: list[dict[str, Any]] = []
    if resuming:
        ckpt = load_checkpoint(last_path, expected_model=model_name)
        check_resume(ckpt, cfg_dict, seed, fingerprint, last_path)
        state = ckpt["state"]
        load_model_state(raw_model, state["model"], f"checkpoint {last_path}")
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"], ckpt["extra"].get("ema_updates", ckpt["step"]))
        for name, opt in optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        for name, sc in scalers.items():
            if name in state.get("scalers", {}) and state["scalers"][name]:
                sc.load_state_dict(state["scalers"][name])
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"])
        if dev.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], dev)
        step_gen.set_state(rng["step"].to(step_gen.get_state().device))
        aug_gen.set_state(rng["augment"])
        order.load(rng["order"])
        start = int(ckpt["step"])
        elapsed_before = float(ckpt["extra"].get("seconds", 0.0))
        saved_best = ckpt["extra"].get("best_value")
        best_value = float(saved_best) if saved_best is not None else -math.inf
        history = _read_log(out / "log.csv", start)
        log(f"resuming {model_name} from {last_path} at iteration {start}")
    elif main:
        atomic_write_text(out / "config.yaml", yaml.safe_dump(_yaml_safe(cfg_dict), sort_keys=False))

    def rng_state() -> dict[str, Any]:
        state = {"torch": torch.get_rng_state(), "step": step_gen.get_state().cpu(),
                 "augment": aug_gen.get_state(), "order": order.state()}
        if dev.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(dev)
        return state

    def make_checkpoint(iteration: int, seconds: float) -> dict[str, Any]:
        return build_checkpoint(
            model_name=model_name, kwargs=kwargs, step_kwargs=step_kwargs,
            class_names=data.class_names, affine=data.affine, normalisation=data.normalisation,
            state={
                "model": raw_model.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "optimizers": {n: o.state_dict() for n, o in optimizers.items()},
                "scalers": {n: s.state_dict() for n, s in scalers.items()},
            },
            step=iteration, rng=rng_state(), config=cfg_dict,
            extra={"seconds": seconds, "data_fingerprint": fingerprint, "seed": seed, "ema_updates": ema.num_updates if ema is not None else 0,
                   "best_value": best_value if math.isfinite(best_value) else None},
        )

    infer_model = ema.module if ema is not None else raw_model
    montage_labels = _sampling_labels(len(data.class_names))

    def run_validation(iteration: int, seconds: float) -> dict[str, float]:
        nonlocal best_value
        was_training = infer_model.training
        infer_model.eval()
        with torch.no_grad():
            metrics = {k: float(v) for k, v in validate(infer_model).items()}  # type: ignore[misc]
        infer_model.train(was_training)
        if select_metric is not None:
            if select_metric not in metrics:
                raise MedgenError(f"validation returned no metric {select_metric!r} (got: {', '.join(metrics)})")
            if metrics[select_metric] > best_value:
                best_value = metrics[select_metric]
                if main:
                    save_checkpoint(best_path, make_checkpoint(iteration, seconds))
        return metrics

    def write_montage(iteration: int) -> None:
        if not (main and can_sample(infer_model)):
            return
        from medgen.plots import save_montage
        from medgen.synthesis import sample_images

        images = sample_images(infer_model, montage_labels, seed=MONTAGE_SEED, batch_size=len(montage_labels),
                               device=dev, precision=precision)
        save_montage(images, montage_labels.tolist(), data.class_names,
                     out / "samples" / f"iter_{iteration:06d}.png", title=f"{model_name} iteration {iteration}")

    log_fields = _log_fields(out / "log.csv") if resuming else []
    good_checkpoint: Path | None = last_path if resuming else None
    t0 = time.perf_counter()
    stopped_by_time = False
    iteration = start
    raw_model.train()
    with make_progress() as progress:
        task = progress.add_task(f"train {model_name}", total=train.iterations, completed=start, info="")
        for it in range(start, train.iterations):
            idx = distributed.shard(order.next(), rank, world)  # this rank's share of the global batch
            batch = Batch(images=data.images[idx], labels=data.labels[idx])
            if transform is not None:
                batch = transform(batch, aug_gen)
            batch = Batch(images=batch.images.to(dev, non_blocking=True),
                          labels=batch.labels.to(dev, non_blocking=True))
            ctx.iteration = it
            losses = step(model, batch, optimizers, ctx)
            values = distributed.reduce_losses({k: float(v) for k, v in losses.items()})  # global-batch means
            bad = [k for k, v in values.items() if not math.isfinite(v)]
            if bad:
                kind = "NaN" if math.isnan(values[bad[0]]) else "infinite"
                where = str(good_checkpoint) if good_checkpoint is not None else "none (no checkpoint written yet)"
                what = bad[0] if "loss" in bad[0] else f"loss {bad[0]}"
                raise MedgenError(f"{what} became {kind} at iteration {it + 1}; last good checkpoint: {where} "
                                  "(lower train.lr?)")
            if ema is not None:
                ema.update(raw_model)
            iteration = it + 1
            seconds = elapsed_before + time.perf_counter() - t0
            out_of_time = train.max_seconds is not None and seconds >= train.max_seconds
            done = iteration == train.iterations or out_of_time
            if iteration % max(train.log_every, 1) == 0 or done:
                row = {"iteration": iteration, "seconds": round(seconds, 3), **values}
                if validate is not None and (done or (validate_every and iteration % validate_every == 0)):
                    row.update({f"val_{k}": v for k, v in run_validation(iteration, seconds).items()})
                history.append(row)
                if main:
                    _append_log(out / "log.csv", row, log_fields, history)
                progress.update(task, info=" ".join(f"{k} {v:.4g}" for k, v in values.items()))
            elif validate is not None and validate_every and iteration % validate_every == 0:
                run_validation(iteration, seconds)
            if train.sample_every and (iteration % train.sample_every == 0 or done):
                write_montage(iteration)
            if main and ((train.checkpoint_every and iteration % train.checkpoint_every == 0) or done):
                _check_weights(raw_model, ema, iteration, good_checkpoint)
                save_checkpoint(last_path, make_checkpoint(iteration, seconds))
                good_checkpoint = last_path
            progress.update(task, completed=iteration)
            if out_of_time:
                stopped_by_time = True
                log(f"time budget of {train.max_seconds:g} s reached at iteration {iteration}")
                break
    seconds = elapsed_before + time.perf_counter() - t0
    if main:
        if not last_path.is_file():
            save_checkpoint(last_path, make_checkpoint(iteration, seconds))
        _finalise(last_path, final_path)
    distributed.barrier()  # other ranks return only once rank 0's checkpoint is in place
    return FitResult(
        checkpoint=final_path, best=best_path if best_path.is_file() else None, history=history,
        seconds=seconds, iterations=iteration, run_dir=out, stopped_by_time=stopped_by_time,
    )


def _finalise(last_path: Path, final_path: Path) -> None:
    """final.pt is a copy of the last checkpoint written at the end of the run (atomic)."""
    from medgen.outputs import atomic_write_bytes

    atomic_write_bytes(final_path, last_path.read_bytes())


def _yaml_safe(obj: Any) -> Any:
    """Tensors in a config dict become lists so yaml.safe_dump can write them."""
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {k: _yaml_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_yaml_safe(v) for v in obj]
    return obj


def _log_fields(path: Path) -> list[str]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f).fieldnames or [])


def _append_log(path: Path, row: dict[str, Any], fields: list[str], history: list[dict[str, Any]]) -> None:
    """Append one row to log.csv; when the row brings new columns, rewrite the file from `history`.

    Args:
        path: the CSV file.
        row: the new row (already appended to history).
        fields: the current header (extended in place).
        history: every row so far.
    """
    if not fields or any(k not in fields for k in row):
        fields += [k for k in row if k not in fields]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(history)
        atomic_write_text(path, buf.getvalue())
        return
    with open(path, "a", newline="", encoding="utf-8") as f:
        csv.DictWriter(f, fieldnames=fields).writerow(row)


def _read_log(path: Path, upto: int | None) -> list[dict[str, Any]]:
    """Rows of log.csv as dicts of floats (iteration as int); with `upto`, rows past it are dropped
    and the file is rewritten (a resumed run repeats the iterations after its last checkpoint)."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        rows = [{k: (int(v) if k == "iteration" else float(v)) for k, v in r.items() if v not in ("", None)}
                for r in reader]
    if upto is not None:
        rows = [r for r in rows if r["iteration"] <= upto]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, buf.getvalue())
    return rows


def default_cache_dir() -> Path:
    """Where the built-in phantom cohort is cached: $MEDGEN_CACHE_DIR or ~/.cache/medgen."""
    import os

    return Path(os.environ.get("MEDGEN_CACHE_DIR") or Path.home() / ".cache" / "medgen")


def load_config_data(cfg: Any, class_names: list[str] | None = None, size: int | None = None) -> ImageSet:
    """The training data a config names: cfg.data.path, or the cached built-in phantom cohort.

    Args:
        cfg: a medgen.config.Config.
        class_names: class order to enforce (e.g. a checkpoint's).
        size: grid size to use instead of cfg.data.size.
    """
    from medgen.data import load_dataset

    spec = cfg.data.path
    if spec is None:
        from medgen.data.phantom import ensure_cohort

        ph = cfg.phantom
        cache = Path(ph.cache_dir).expanduser() if ph.cache_dir else default_cache_dir()
        log(f"using the built-in phantom cohort (n={ph.n}, seed={ph.seed}, size={ph.size}) cached in {cache}")
        spec = ensure_cohort(cache, n=ph.n, seed=ph.seed, effect_scale=ph.effect_scale, size=ph.size)
    return load_dataset(spec, image_column=cfg.data.image_column, label_column=cfg.data.label_column,
                        group_column=cfg.data.group_column, size=size or cfg.data.size, class_names=class_names)
