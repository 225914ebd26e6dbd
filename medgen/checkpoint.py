"""Self-describing checkpoints: saved atomically, loaded with `torch.load(weights_only=True)` only.

A checkpoint is a plain dict of tensors and plain Python values (no numpy objects, no dataclasses,
no classes), so the restricted unpickler of `weights_only=True` can read it and nothing in the file
is ever executed:

    {"format": "medgen-checkpoint", "version": 1, "model": registry name, "kwargs": model kwargs,
     "step_kwargs": ..., "class_names": [...], "affine": Tensor[4, 4] float64 or None,
     "normalisation": {...}, "state": {"model", "ema", "optimizers": {name: sd}, "scalers": {name: sd}},
     "step": completed iterations, "rng": {name: state tensor}, "config": {...}, "medgen_version": str,
     "extra": {...}}

A run folder holds `last.pt` (rewritten every `checkpoint_every` iterations; what --resume reads),
`final.pt` (written once when the run ends) and, with validation, `best.pt`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import medgen
from medgen.errors import MedgenError
from medgen.models.memory import check_model_fits
from medgen.models.registry import create_model
from medgen.outputs import atomic_write

FORMAT = "medgen-checkpoint"
VERSION = 1
FINAL_NAME = "final.pt"
LAST_NAME = "last.pt"
BEST_NAME = "best.pt"


def to_plain(obj: Any) -> Any:
    """Convert numpy arrays/scalars, dataclasses, paths and tuples into tensors and plain Python values."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj).copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_plain(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        # int keys stay ints: optimizer state dicts are keyed by parameter index
        return {(k if isinstance(k, (int, str)) else str(k)): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise MedgenError(f"cannot store a value of type {type(obj).__name__} in a checkpoint")


def build_checkpoint(
    *,
    model_name: str,
    kwargs: dict[str, Any],
    state: dict[str, Any],
    step: int,
    step_kwargs: dict[str, Any] | None = None,
    class_names: list[str] | None = None,
    affine: Any = None,
    normalisation: dict[str, Any] | None = None,
    rng: dict[str, torch.Tensor] | None = None,
    config: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the checkpoint dict (every value converted to tensors / plain Python).

    Args:
        model_name: registry name of the model.
        kwargs: the model's constructor keyword arguments (enough to rebuild it).
        state: {"model": sd, "ema": sd or None, "optimizers": {name: sd}, "scalers": {name: sd}}.
        step: completed iterations.
        step_kwargs: the Step's hyper-parameters.
        class_names: class name per label index.
        affine: 4x4 training-space affine (numpy or tensor), None for 2D data.
        normalisation: how intensities were mapped to [-1, 1].
        rng: named RNG states (tensors).
        config: the resolved run config as a plain dict.
        extra: anything else plain (e.g. elapsed seconds, best metric).
    """
    aff = None
    if affine is not None:
        aff = torch.as_tensor(np.asarray(affine, dtype=np.float64)).clone()
        if tuple(aff.shape) != (4, 4):
            raise MedgenError(f"affine must be 4x4, got shape {tuple(aff.shape)}")
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": model_name,
        "kwargs": to_plain(kwargs),
        "step_kwargs": to_plain(step_kwargs or {}),
        "class_names": [str(c) for c in (class_names or [])],
        "affine": aff,
        "normalisation": to_plain(normalisation or {}),
        "state": to_plain(state),
        "step": int(step),
        "rng": to_plain(rng or {}),
        "config": to_plain(config or {}),
        "medgen_version": medgen.__version__,
        "extra": to_plain(extra or {}),
    }


def save_checkpoint(path: str | os.PathLike, checkpoint: dict[str, Any] | None = None, **fields: Any) -> Path:
    """Write a checkpoint atomically: temp file in the same folder, fsync, os.replace.

    Args:
        path: destination file.
        checkpoint: a dict from build_checkpoint; or give its keyword arguments as **fields.
    Returns:
        The path written.
    """
    if checkpoint is None:
        checkpoint = build_checkpoint(**fields)
    bad = nonfinite_weights(checkpoint.get("state", {}))
    if bad:  # never write (or later name good) weights that are NaN/Inf
        raise MedgenError(f"refusing to write checkpoint {path}: {len(bad)} weight tensor(s) are non-finite "
                          f"(e.g. {bad[0]}); training diverged (lower train.lr?)")
    return atomic_write(path, lambda f: torch.save(checkpoint, f))


def nonfinite_weights(state: dict[str, Any]) -> list[str]:
    """Names of floating tensors holding NaN/Inf in a checkpoint state's model and EMA weights."""
    bad = []
    for part in ("model", "ema"):
        for name, t in (state.get(part) or {}).items():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(f"{part}.{name}")
    return bad


def resolve_checkpoint_path(path_or_run: str | os.PathLike) -> Path:
    """A checkpoint file, or a run folder (its final.pt, else last.pt)."""
    p = Path(path_or_run)
    if p.is_dir():
        for name in (FINAL_NAME, LAST_NAME):
            if (p / name).is_file():
                return p / name
        raise MedgenError(f"run folder {p} holds no checkpoint ({FINAL_NAME} or {LAST_NAME})")
    if not p.is_file():
        raise MedgenError(f"checkpoint {p} not found")
    return p


def load_checkpoint(path: str | os.PathLike, expected_model: str | None = None) -> dict[str, Any]:
    """Read a checkpoint with torch.load(weights_only=True); refuse anything that is not plain weights.

    Args:
        path: a checkpoint file or a run folder.
        expected_model: when given, the registry name the checkpoint must hold.
    """
    p = resolve_checkpoint_path(path)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        # GLOBAL / REDUCE of a class or function: the file asks to build Python objects
        if "Unsupported global" in text or "Unsupported class" in text or "global" in text.lower().split("weightsunpickler")[-1]:
            raise MedgenError(
                f"checkpoint {p} holds Python objects; refusing to load (only weights are accepted)"
            ) from None
        detail = text.split("WeightsUnpickler error:")[-1] if "WeightsUnpickler error:" in text else text
        raise MedgenError(f"checkpoint {p} is corrupt or truncated ({_first_line(detail)})") from None
    except Exception as e:  # torch's legacy reader raises KeyError/RuntimeError/... on arbitrary bytes
        raise MedgenError(f"checkpoint {p} is corrupt, truncated or not a PyTorch file ({_first_line(str(e))})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise MedgenError(f"checkpoint {p} is not a medgen checkpoint (no format {FORMAT!r})")
    if ckpt.get("version") != VERSION:
        raise MedgenError(f"checkpoint {p} has format version {ckpt.get('version')!r}; this medgen reads {VERSION}")
    for key in ("model", "kwargs", "state", "step"):
        if key not in ckpt:
            raise MedgenError(f"checkpoint {p} lacks the key {key!r}")
    if expected_model is not None and ckpt["model"] != expected_model:
        raise MedgenError(f"checkpoint {p} holds model {ckpt['model']!r}, not {expected_model!r}")
    ckpt["kwargs"] = upgrade_kwargs(ckpt["model"], ckpt["kwargs"])
    ckpt["path"] = str(p)
    return ckpt


# Constructor arguments renamed since checkpoints were first written: model -> {old name: new name}.
KWARG_RENAMES: dict[str, dict[str, str]] = {"parallel-vae": {"latent_dim": "latent_per_decoder"}}


def upgrade_kwargs(model_name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's model kwargs under today's argument names (older checkpoints keep loading)."""
    renames = KWARG_RENAMES.get(model_name, {})
    return {renames.get(k, k) if renames.get(k, k) not in kwargs else k: v for k, v in kwargs.items()}


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:200]


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a checkpoint file (a run folder resolves to its final checkpoint)."""
    h = hashlib.sha256()
    with open(resolve_checkpoint_path(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_meta(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The descriptive part of a loaded checkpoint (affine as a numpy float64 array)."""
    aff = ckpt.get("affine")
    return {
        "model": ckpt["model"],
        "kwargs": dict(ckpt["kwargs"]),
        "step_kwargs": dict(ckpt.get("step_kwargs", {})),
        "class_names": list(ckpt.get("class_names", [])),
        "affine": None if aff is None else aff.numpy().astype(np.float64),
        "normalisation": dict(ckpt.get("normalisation", {})),
        "step": int(ckpt["step"]),
        "config": ckpt.get("config", {}),
        "medgen_version": ckpt.get("medgen_version"),
        "path": ckpt.get("path"),
        "extra": ckpt.get("extra", {}),
    }


def load_model_state(model: nn.Module, state_dict: dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict(strict) with one clear error line on a mismatch."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise MedgenError(f"{where} does not match the model ({_first_line(str(e))})") from None


def model_from_checkpoint(
    path_or_run_dir: str | os.PathLike, ema: bool = True, expected_model: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a checkpoint (or a run folder's final checkpoint), on the CPU, in eval mode.

    Args:
        path_or_run_dir: a checkpoint file or a run folder.
        ema: load the EMA weights when the checkpoint has them (used for sampling).
        expected_model: when given, the registry name the checkpoint must hold.
    Returns:
        (model, meta) with meta keys model, kwargs, step_kwargs, class_names, affine, normalisation,
        step, config, path, sha256.
    """
    ckpt = load_checkpoint(path_or_run_dir, expected_model=expected_model)
    meta = checkpoint_meta(ckpt)
    check_model_fits(meta["model"], meta["kwargs"], f"checkpoint {meta['path']}")  # kwargs edited to a huge model
    model = create_model(meta["model"], **meta["kwargs"])
    state = ckpt["state"]
    sd = state.get("ema") if ema and state.get("ema") is not None else state["model"]
    bad = nonfinite_weights({"model": sd})
    if bad:
        raise MedgenError(f"checkpoint {meta['path']} holds {len(bad)} non-finite weight tensor(s) (e.g. "
                          f"{bad[0].split('.', 1)[1]}): training diverged; use an earlier checkpoint")
    load_model_state(model, sd, f"checkpoint {meta['path']}")
    model.eval()
    meta["sha256"] = checkpoint_sha256(meta["path"])
    meta["weights"] = "ema" if sd is state.get("ema") else "model"
    return model, meta
