"""Seeding, device resolution and the one mixed-precision path."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

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


def cpu_bf16_supported() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (avx512_bf16 or AMX); emulated bf16 is slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_precision(device: torch.device) -> str:
    """The fastest correct precision per device (see benchmarks/README.md for the measurements).

    CUDA: bf16 autocast (TF32 for the fp32 parts) on GPUs with bf16, else TF32; from published best
    practice, not measured here. CPU: bf16 autocast where oneDNN has native bf16 kernels, else fp32.
    """
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "tf32"
    return "bf16" if cpu_bf16_supported() else "fp32"


def default_channels_last(device: torch.device) -> bool:
    """Whether models train in channels_last(_3d) by default: on CUDA (published best practice for cuDNN
    bf16 convolutions; not measured here) and on CPU together with native bf16 (measured: oneDNN's bf16
    convolutions are fastest in channels_last_3d, see benchmarks/README.md)."""
    return device.type == "cuda" or default_precision(device) == "bf16"


def memory_format(ndim: int) -> torch.memory_format:
    """channels_last_3d for 5-D tensors, channels_last for 4-D, contiguous otherwise."""
    return {5: torch.channels_last_3d, 4: torch.channels_last}.get(ndim, torch.contiguous_format)


def to_channels_last(model: nn.Module) -> nn.Module:
    """Convert the conv weights of `model` to channels_last(_3d) in place (inputs follow the weights)."""
    ndim = next((p.ndim for p in model.parameters() if p.ndim in (4, 5)), None)
    if ndim is not None:
        model.to(memory_format=memory_format(ndim))
    return model


def configure_backends(device: torch.device, *, cudnn_benchmark: bool = True) -> None:
    """Global backend switches for training: cudnn.benchmark picks the fastest conv algorithm per shape
    (input shapes are fixed during training, so autotuning pays off after the first iteration)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark


COMPILE_CHILDREN = ("encoder", "generator", "decoder", "decoders", "backbone", "net")


def compile_model(model: nn.Module, *, mode: str | None = None) -> list[str]:
    """Compile the parts of a model whose graphs need only a first-order backward, in place.

    Critics are left eager: the WGAN-GP gradient penalty differentiates their gradient (double backward),
    which torch.compile does not support. Models without such a part are compiled whole.

    Args:
        model: the model; `nn.Module.compile()` keeps the state-dict keys unchanged.
        mode: torch.compile mode (None, "max-autotune", "reduce-overhead" = CUDA graphs).

    Returns:
        The names of the compiled children ("" for the whole model).
    """
    names = [n for n, _ in model.named_children()]
    has_critic = any("discriminator" in n or "critic" in n for n in names)
    if not has_critic:
        model.compile(mode=mode)
        return [""]
    done = []
    for name, child in model.named_children():
        if name in COMPILE_CHILDREN:
            child.compile(mode=mode)
            done.append(name)
    return done


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
