"""Seeding, device resolution and the one mixed-precision path."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from medgen.errors import MedgenError

PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU torch.Generator seeded with `seed`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """Map "auto" | "cpu" | "cuda" | "cuda:N" to a torch.device, with a clear error if unavailable."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MedgenError(f"--device {name} asked for, but no CUDA device is available (use --device cpu)")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise MedgenError(f"unknown device {name!r}; use auto, cpu or cuda") from e


def default_precision(device: torch.device) -> str:
    """The fastest correct precision per device (see benchmarks/README.md for the measurements)."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "tf32"
    return "fp32"


@dataclass
class Precision:
    """How a step runs its forward passes: autocast dtype (or None) and whether a GradScaler is needed."""

    name: str
    device_type: str
    autocast_dtype: torch.dtype | None

    @property
    def needs_scaler(self) -> bool:
        return self.autocast_dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        """The single AMP entry point: torch.autocast(device.type, dtype) or a null context."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def make_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.needs_scaler)


def resolve_precision(name: str, device: torch.device) -> Precision:
    """Turn a precision name into a Precision and set TF32 flags accordingly.

    Args:
        name: one of auto, fp32, tf32, bf16, fp16.
        device: the device the model runs on.
    """
    if name not in PRECISIONS:
        raise MedgenError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    if name == "auto":
        name = default_precision(device)
    if name == "fp16" and device.type != "cuda":
        raise MedgenError("precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    tf32 = name in ("tf32", "bf16")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)
    return Precision(name=name, device_type=device.type, autocast_dtype=dtype)


def env_flag(name: str) -> bool:
    """True when an environment variable is set to 1/true/yes."""
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
