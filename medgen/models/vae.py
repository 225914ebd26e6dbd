"""Conditional VAE, registered as "vae": conv encoder -> (mu, logvar) -> z -> the GAN generator as decoder.

With `class_prior` the prior is class-conditional, p(z | y) = N(m_y, I) with learned means m_y, and the encoder
does not see the class: q(z | x). Codes are kept standardised (z - m_y), so the training step's KL against N(0, I),
`sample(z, labels)` on standard normal z and encode/decode round trips work unchanged; the decoder gets z + m_y.
Why: a class-conditioned encoder learns to subtract each class's centroid from the code (the KL rewards it) and a
decoder that reads anatomy from z then draws the same anatomy for every class; with the class prior the class
centroids stay in the decoder's input and prior samples of class y sit at its centroid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medgen.models.blocks import embed_labels, fitted_intensities, fitted_prior
from medgen.models.networks import Encoder, Generator, check_common
from medgen.models.registry import register_model


@dataclass
class VAEOutput:
    """recon [B, C, *spatial] in [-1, 1]; mu, logvar, z [B, latent_dim]."""

    recon: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    z: torch.Tensor


@register_model("vae")
class VAE(nn.Module):
    """Conditional VAE: q(z | x, y) by a conv encoder, p(x | z, y) by the DCGAN generator.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        num_classes: number of classes.
        image_size: image edge length (4 * 2**n).
        base_width: width unit (64: published size; 8-16 on CPU).
        latent_dim: size of z.
        upsample: decoder upsampling, "transpose" or "nearest".
        norm: normalisation of encoder and decoder blocks.
        logvar_clamp: |logvar| bound that keeps exp(logvar) finite early in training (0: none).
        class_prior: class-conditional prior N(m_y, I) and a class-blind encoder (see the module docstring).
        class_offset: a learned full-resolution map per class added before the output tanh (see Generator).
        generator_output: "image" (voxels, DCGAN) or "warp" (a deformable template; see Generator).
        warp_size: the warp output's field grid edge (0: image_size / 2).
        max_displacement: the warp output's largest displacement (fraction of the half field of view).
        noise: learned observation noise on the decoder's output (see Generator); its sd follows the maximum-likelihood
            fit to the high-frequency part of the reconstruction residual (training/steps/vae.py, fit_noise).
        sample_prior: "standard" (sample() decodes z ~ N(0, I) as given) or "fitted" (a per-class Gaussian over
            the training codes, fitted by training's SamplePrior hook, maps the N(0, I) draws of sample_images and
            synth; see FittedCodePrior).
        match_intensities: map samples, voxel by voxel in rank order, onto an intensity quantile function drawn
            from the class's training volumes, with their noise level (fitted by training's SamplePrior hook; see
            FittedIntensities).
        intensity_smooth: with match_intensities, the SD in voxels of a Gaussian that first smooths away the
            generator's own voxel-scale texture (speckle, checkerboards) inside the brain; 0: none.
        intensity_sharpen: with match_intensities, add back the samples' edge detail inside the brain with a gain
            fitted during training so that it matches the training volumes' (FittedIntensities.fit_gain).
    """

    def __init__(self, *, spatial_dims: int = 3, in_channels: int = 1, num_classes: int = 3, image_size: int = 64,
                 base_width: int = 8, latent_dim: int = 128, upsample: str = "transpose", norm: str = "batch",
                 logvar_clamp: float = 10.0, class_prior: bool = False, class_offset: bool = False,
                 generator_output: str = "image", warp_size: int = 0, max_displacement: float = 0.2,
                 noise: bool = False, sample_prior: str = "standard",
                 match_intensities: bool = False, intensity_smooth: float = 0.0,
                 intensity_sharpen: bool = False) -> None:
        super().__init__()
        check_common("model 'vae'", spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes,
                     image_size=image_size, base_width=base_width, latent_dim=latent_dim)
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.image_size = image_size
        self.in_channels = in_channels
        self.spatial_dims = spatial_dims
        self.logvar_clamp = logvar_clamp
        self.class_prior = class_prior
        self.encoder = Encoder(spatial_dims=spatial_dims, in_channels=in_channels,
                               num_classes=0 if class_prior else num_classes, image_size=image_size,
                               base_width=base_width, out_features=2 * latent_dim, norm=norm)
        # the prior means m_y, one row per class, zero at the start (the N(0, I) prior)
        self.prior = nn.Embedding(num_classes, latent_dim) if class_prior else None
        if self.prior is not None:
            nn.init.zeros_(self.prior.weight)
        self.decoder = Generator(spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes,
                                 image_size=image_size, base_width=base_width, latent_dim=latent_dim,
                                 upsample=upsample, norm=norm, class_offset=class_offset,
                                 output=generator_output, warp_size=warp_size, max_displacement=max_displacement,
                                 noise=noise)
        self.code_prior = fitted_prior("model 'vae'", sample_prior, num_classes, latent_dim)
        self.intensity_prior = fitted_intensities(match_intensities, num_classes, intensity_smooth,
                                                   intensity_sharpen)

    def prior_mean(self, labels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """m_y [B, latent_dim] for labels [B] (or class weights [B, K]); zeros without a class prior."""
        if self.prior is None:
            return torch.zeros_like(like)
        return embed_labels(self.prior, labels).to(like.dtype)

    def encode(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior parameters (mu, logvar), each [B, latent_dim] (mu standardised by the class prior's mean)."""
        mu, logvar = self.encoder(x, None if self.class_prior else labels).chunk(2, dim=1)  # [B, 2L] -> 2 x [B, L]
        if self.logvar_clamp > 0:
            logvar = logvar.clamp(-self.logvar_clamp, self.logvar_clamp)
        if self.prior is not None:
            mu = mu - self.prior_mean(labels, mu)
        return mu, logvar

    @property
    def observation_noise(self) -> bool:
        """Whether sample() takes observation noise (the decoder's `noise` option)."""
        return self.decoder.observation_noise

    def sample(self, z: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Decode (standardised) latents z [B, latent_dim] with labels [B] to images [B, C, *spatial] in [-1, 1]
        (noise: standard normal like the images, for the observation noise; None: the mean image)."""
        if self.prior is not None:
            z = z + self.prior_mean(labels, z)
        return self.decoder(z, labels, noise)

    def forward(self, x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None) -> VAEOutput:
        """Encode, reparameterise, decode.

        Args:
            x: images [B, C, *spatial] in [-1, 1].
            labels: class indices [B].
            generator: source of the reparameterisation noise in training mode when `noise` is not given.
            noise: standard normal eps [B, latent_dim] for z = mu + sigma * eps (any mode).
                Without noise, eval mode uses z = mu.
        """
        mu, logvar = self.encode(x, labels)
        if noise is None and self.training:
            noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        if noise is not None:
            z = mu + torch.exp(0.5 * logvar) * noise.to(mu.dtype)
        else:
            z = mu
        return VAEOutput(recon=self.sample(z, labels), mu=mu, logvar=logvar, z=z)

    @classmethod
    def tiny_kwargs(cls, spatial_dims: int) -> dict[str, Any]:
        """Small constructor arguments for the model checklist test."""
        return dict(spatial_dims=spatial_dims, in_channels=1, num_classes=3, image_size=16, base_width=4,
                    latent_dim=8)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        """forward() keyword arguments for the checklist test (CPU tensors)."""
        shape = (batch_size, self.in_channels) + (self.image_size,) * self.spatial_dims
        return dict(x=torch.rand(shape, generator=generator) * 2 - 1,
                    labels=torch.arange(batch_size) % max(self.num_classes, 1), generator=generator)
