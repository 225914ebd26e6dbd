"""Sampling from generative models: latents from a seeded CPU generator, decoded batch by batch.

Noise is drawn on the CPU from a seeded generator, so the same seed gives the same images on any device.
A model can sample when it has `latent_dim` and `sample(z, labels)` (see `can_sample`).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from medgen.errors import MedgenError
from medgen.models.blocks import gaussian_codes, is_soft


def draw_latents(n: int, latent_dim: int, seed: int) -> torch.Tensor:
    """Standard normal latents [n, latent_dim] from a CPU generator seeded with `seed`."""
    return torch.randn(n, int(latent_dim), generator=torch.Generator().manual_seed(int(seed)))


def as_labels(labels: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Class indices [N] as int64, or class weights [N, K] kept as they are (soft conditions)."""
    labels = torch.as_tensor(labels)
    if not is_soft(labels):
        labels = labels.to(torch.int64).reshape(-1)
    return labels


def prior_codes(model: nn.Module, z: torch.Tensor, labels: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """The codes to decode for standard normal draws z [N, latent_dim]: z itself, or z mapped by the model's fitted
    code prior (`sample_prior: fitted`) to where its training codes lie."""
    prior = getattr(model, "code_prior", None)
    if prior is None:
        return z
    labels = as_labels(labels)
    with torch.no_grad():  # the draws stay on the CPU (device-independent samples); the model may be on a GPU
        return gaussian_codes(prior.loc.detach().cpu(), prior.tril.detach().cpu(), z.cpu(), labels.cpu())


def latent_noise(z: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal observation noise [N, *shape], row i from a CPU generator seeded by the bytes of z[i]:
    the same latent gives the same volume whatever the batching, device or order."""
    rows = []
    for code in z.detach().float().cpu():
        seed = int.from_bytes(hashlib.blake2b(code.numpy().tobytes(), digest_size=8).digest(), "little") >> 1
        rows.append(torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed)))
    return torch.stack(rows)


def decode(
    model: nn.Module,
    z: torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    precision: Any = None,
    match: bool = True,
) -> torch.Tensor:
    """Decode latents z [N, latent_dim] with labels [N] (or class weights [N, K]) by `model.sample`, in eval mode,
    batch by batch.

    Args:
        match: map the images onto the model's fitted intensity distribution (`match_intensities`; no-op
            without one); False for reconstructions, which should keep their own intensities.
    Returns:
        [N, C, *spatial] float32 on the CPU, clamped to [-1, 1].
    """
    if not can_sample(model):
        raise MedgenError(f"model {type(model).__name__} cannot sample (no sample()/latent_dim)")
    labels = as_labels(labels)
    if labels.shape[0] == 0:
        raise MedgenError("no labels to sample")
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    was_training = model.training
    model.eval()
    model.to(dev)
    chunks = []
    ctx = precision.autocast if precision is not None else _null
    shape = None  # with observation noise: the image shape, from the mean of the first row (once)
    with torch.no_grad():
        if getattr(model, "observation_noise", False):
            with ctx():
                shape = model.sample(z[:1].to(dev), labels[:1].to(dev)).shape[1:]
        for i in range(0, labels.shape[0], max(1, batch_size)):
            zi, yi = z[i : i + batch_size].to(dev), labels[i : i + batch_size].to(dev)
            noise = None if shape is None else latent_noise(z[i : i + batch_size], shape).to(dev)  # the latents' own
            with ctx():
                x = model.sample(zi, yi) if noise is None else model.sample(zi, yi, noise=noise)
            x = x.float().cpu().clamp_(-1.0, 1.0)
            chunks.append(match_intensities(model, x, yi.cpu()) if match else x)
    model.train(was_training)
    return torch.cat(chunks).clamp_(-1.0, 1.0)


def match_intensities(model: nn.Module, images: torch.Tensor, labels: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Images [N, C, *spatial] mapped by rank onto the model's fitted per-class intensity distribution
    (`match_intensities`, see FittedIntensities); unchanged for models without one or before it is fitted."""
    prior = getattr(model, "intensity_prior", None)
    if prior is None:
        return images
    with torch.no_grad():
        return prior(images, as_labels(labels))


def sample_images(
    model: nn.Module,
    labels: Sequence[int] | torch.Tensor,
    *,
    seed: int,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    precision: Any = None,
    match: bool = True,
) -> torch.Tensor:
    """Decode one latent per label with `model.sample(z, labels)`; deterministic for a given seed.

    Args:
        model: a generative model with `latent_dim` and `sample(z, labels)`.
        labels: class index per image.
        seed: seed of the CPU generator that draws all latents.
        batch_size: images decoded per forward pass (changes results only by float rounding).
        device: where the model runs (the model is moved there).
        precision: optional runtime.Precision whose autocast wraps the decoding.
        match: map the images onto the model's fitted intensity distribution (see `decode`); False: the raw
            samples.
    Returns:
        [N, C, *spatial] float32 on the CPU, clamped to [-1, 1].
    """
    if not (hasattr(model, "sample") and hasattr(model, "latent_dim")):
        raise MedgenError(f"model {type(model).__name__} cannot sample (no sample()/latent_dim)")
    n = len(labels)
    z = prior_codes(model, draw_latents(n, model.latent_dim, seed), labels)  # [N, latent_dim]
    return decode(model, z, labels, batch_size=batch_size, device=device, precision=precision, match=match)


def _null():
    return contextlib.nullcontext()


def can_sample(model: nn.Module) -> bool:
    return hasattr(model, "sample") and hasattr(model, "latent_dim")


def can_encode(model: nn.Module) -> bool:
    """Whether the model is an autoencoder medgen can encode with (vae: the posterior mean; alpha-gan: E(x))."""
    return can_sample(model) and hasattr(model, "encode")


def encode(model: nn.Module, images: torch.Tensor, labels: Sequence[int] | torch.Tensor, *, batch_size: int = 8,
           device: str | torch.device = "cpu") -> torch.Tensor:
    """Latent codes [N, latent_dim] of images [N, C, *spatial] (in [-1, 1]) in eval mode: the VAE's posterior mean,
    the alpha-GAN encoder's code. Returned float32 on the CPU."""
    if not can_encode(model):
        raise MedgenError(f"model {type(model).__name__} has no encoder (use a vae or alpha-gan checkpoint)")
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    was_training = model.training
    model.eval()
    model.to(dev)
    out = []
    with torch.no_grad():
        for i in range(0, labels.numel(), max(1, batch_size)):
            code = model.encode(images[i : i + batch_size].to(dev), labels[i : i + batch_size].to(dev))
            code = code[0] if isinstance(code, tuple) else code  # vae: (mu, logvar) -> mu
            out.append(code.float().cpu())
    model.train(was_training)
    return torch.cat(out)


def reconstruct(model: nn.Module, images: torch.Tensor, labels: Sequence[int] | torch.Tensor, *,
                batch_size: int = 8, device: str | torch.device = "cpu") -> torch.Tensor:
    """Decode(encode(images)) with the same labels: [N, C, *spatial] float32 on the CPU in [-1, 1]."""
    z = encode(model, images, labels, batch_size=batch_size, device=device)
    return decode(model, z, labels, batch_size=batch_size, device=device, match=False)
