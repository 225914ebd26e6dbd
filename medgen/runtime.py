"""Seeding, device resolution and the one mixed-precision path."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any

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
    (input shapes are fixed during training, so autotuning pays off after the first iteration). CPU thread
    counts are left to PyTorch / OMP_NUM_THREADS (on a CPU shared with other jobs, OMP_NUM_THREADS=1 is
    much faster: see benchmarks/README.md)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark


def bf16_conv_hazards(model: nn.Module) -> list[str]:
    """Conv layers whose bf16 backward oneDNN gets wrong on CPU: a kernel larger than the input.

    Measured here (torch 2.13, oneDNN 3.12, native-bf16 CPU; benchmarks/README.md): when a padded
    convolution's kernel is larger than its input along some axis (k3 on a 2^3 map, k7 s2 p3 on 4^3, k4 on
    3^3, ...), the bf16 weight and input gradients are garbage, inf or NaN in most calls (at 8-32 channels,
    in NCDHW and channels_last_3d alike; one sweep ended in a heap corruption), while fp32 and PyTorch's
    own bf16 kernels (oneDNN off) are right. Transposed convolutions fail the same way (k3 s1 p1 on 2^3,
    k3 s2 p1 on 1^3). No fault was seen with the kernel no larger than the input, so every conv whose
    kernel exceeds its input is flagged (a superset of the faults seen). One batch-1 forward (eval mode, no grad) finds each conv's
    input size.

    Returns:
        Names of the hazardous layers; ["?"] when the model gives no way to build an input (the model
        protocol's `example_inputs`, or in_channels/image_size/spatial_dims; medgen/models/protocol.py).
    """
    gen = torch.Generator().manual_seed(0)
    if hasattr(model, "example_inputs"):
        inputs = model.example_inputs(1, gen)
    elif all(hasattr(model, a) for a in ("in_channels", "image_size", "spatial_dims")):
        inputs = {"x": torch.zeros(1, model.in_channels, *[model.image_size] * model.spatial_dims)}
    else:
        return ["?"]
    found: list[str] = []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d | nn.Conv3d | nn.ConvTranspose2d | nn.ConvTranspose3d):
            def hook(mod, args, _out, name=name):
                if any(k > n for k, n in zip(mod.kernel_size, args[0].shape[2:], strict=True)):
                    found.append(name)

            hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(**inputs) if isinstance(inputs, dict) else model(inputs)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return sorted(set(found))


class _Fp32Forward:
    """Mixin: the layer runs in fp32 with autocast off on CPU (its output is fp32; the next op autocasts
    again). For convolutions on maps smaller than their kernel, where oneDNN's bf16 backward is wrong; such
    maps are tiny, so the cost is negligible."""

    def forward(self, input: torch.Tensor, *args: Any) -> torch.Tensor:
        if input.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
            return super().forward(input, *args)
        with torch.autocast("cpu", enabled=False):
            return super().forward(input.float(), *args)


class Fp32Conv2d(_Fp32Forward, nn.Conv2d):
    """nn.Conv2d computed in fp32 under CPU autocast (see _Fp32Forward)."""


class Fp32Conv3d(_Fp32Forward, nn.Conv3d):
    """nn.Conv3d computed in fp32 under CPU autocast (see _Fp32Forward)."""


class Fp32ConvTranspose2d(_Fp32Forward, nn.ConvTranspose2d):
    """nn.ConvTranspose2d computed in fp32 under CPU autocast (see _Fp32Forward)."""


class Fp32ConvTranspose3d(_Fp32Forward, nn.ConvTranspose3d):
    """nn.ConvTranspose3d computed in fp32 under CPU autocast (see _Fp32Forward)."""


_FP32_VERSIONS = {nn.Conv2d: Fp32Conv2d, nn.Conv3d: Fp32Conv3d,
                  nn.ConvTranspose2d: Fp32ConvTranspose2d, nn.ConvTranspose3d: Fp32ConvTranspose3d}


def guard_bf16_convs(model: nn.Module) -> list[str]:
    """Run the convs that `bf16_conv_hazards` finds in fp32 under CPU autocast, in place.

    Everything else keeps bf16 and its memory format; parameters and state-dict keys are untouched.

    Returns:
        The names of the guarded layers.

    Raises:
        MedgenError: the model gives no way to probe its layer inputs.
    """
    names = bf16_conv_hazards(model)
    if names == ["?"]:
        raise MedgenError(f"{type(model).__name__}: cannot probe its conv inputs for the CPU bf16 guard "
                          "(no example_inputs); train it with --precision fp32")
    modules = dict(model.named_modules())
    for name in names:
        m = modules[name]
        if type(m) in _FP32_VERSIONS:
            m.__class__ = _FP32_VERSIONS[type(m)]
    return names


def has_instance_norm(model: nn.Module) -> bool:
    """Whether the model has InstanceNorm layers: they run slower in channels_last(_3d) on CPU (measured:
    a 32^3 classifier with instance norm trains 0.90x fp32 speed in bf16 + channels_last_3d, 1.09x in bf16
    NCDHW; with batch norm 1.20x in channels_last_3d), so the CPU default keeps such models in NCDHW."""
    return any(isinstance(m, nn.InstanceNorm2d | nn.InstanceNorm3d) for m in model.modules())


class SpaceToDepthConv3d(nn.Conv3d):
    """A k4 s2 p1 Conv3d on few input channels, computed as space-to-depth + a k2 s1 conv.

    Same weights, same result (up to rounding): each 2x2x2 block of the padded input becomes 8 channels
    and the 4^3 kernel the matching 8-channel 2^3 kernel. oneDNN vectorises over channels, so a 1-channel
    input layer (the first layer of every critic/encoder, also differentiated twice by the gradient
    penalty) runs about 2-2.7x faster this way on CPU (benchmarks/README.md). The state dict is unchanged.
    """

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if input.dim() != 5 or any(n % 2 for n in input.shape[2:]):
            return super()._conv_forward(input, weight, bias)
        b, c = input.shape[:2]
        xp = nn.functional.pad(input, (1, 1, 1, 1, 1, 1))
        d, h, w = (n // 2 for n in xp.shape[2:])
        # [B, C, 2d, 2h, 2w] -> [B, C*8, d, h, w]: voxel (2i + a) goes to channel (c, a), position i
        xs = xp.reshape(b, c, d, 2, h, 2, w, 2).permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * 8, d, h, w)
        o = weight.shape[0]
        # [O, C, 4, 4, 4] -> [O, C*8, 2, 2, 2]: tap (2i + a) goes to channel (c, a), tap i
        ws = weight.reshape(o, c, 2, 2, 2, 2, 2, 2).permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(o, c * 8, 2, 2, 2)
        cl = torch.channels_last_3d
        return nn.functional.conv3d(xs.contiguous(memory_format=cl), ws.contiguous(memory_format=cl), bias)


def use_space_to_depth_stems(model: nn.Module, max_in_channels: int = 2) -> int:
    """Switch eligible Conv3d layers (k4 s2 p1, <= max_in_channels inputs) to SpaceToDepthConv3d in place.

    Returns:
        The number of layers switched (parameters and state-dict keys are untouched).
    """
    n = 0
    for m in model.modules():
        if (type(m) is nn.Conv3d and m.in_channels <= max_in_channels and m.kernel_size == (4, 4, 4)
                and m.stride == (2, 2, 2) and m.padding == (1, 1, 1) and m.dilation == (1, 1, 1)
                and m.groups == 1 and m.padding_mode == "zeros"):
            m.__class__ = SpaceToDepthConv3d
            n += 1
    return n


def default_space_to_depth(device: torch.device) -> bool:
    """Space-to-depth stems by default on CPU (measured); on CUDA not measured here, so off."""
    return device.type == "cpu"


def compile_model(model: nn.Module, *, mode: str | None = None) -> list[str]:
    """Compile the parts of a model whose graphs need only a first-order backward, in place.

    The model names them in `compile_children` (the model protocol, medgen/models/protocol.py): critics are
    left out, since the WGAN-GP gradient penalty differentiates their gradient (double backward), which
    torch.compile does not support. A model without `compile_children` is compiled whole.

    Args:
        model: the model; `nn.Module.compile()` keeps the state-dict keys unchanged.
        mode: torch.compile mode (None, "max-autotune", "reduce-overhead" = CUDA graphs).

    Returns:
        The names of the compiled children ("" for the whole model).
    """
    children = getattr(model, "compile_children", None)
    if children is None:
        model.compile(mode=mode)
        return [""]
    done = []
    for name, child in model.named_children():
        if name in children:
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

