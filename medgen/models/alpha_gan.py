"""Conditional alpha-GAN (Rosca et al. 2017; 3D brains as in Kwon et al., MICCAI 2019), registered as "alpha-gan".

Four networks: encoder E (x -> code z, deterministic), generator G (z, class -> x), image critic D
(projection-conditioned) and code critic C (an MLP on z). Trained by training/steps/alpha_gan.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medgen.models.blocks import embed_labels, fitted_intensities, fitted_prior
from medgen.models.networks import CodeDiscriminator, Encoder, check_common, generator_and_critic
from medgen.models.registry import register_model


@dataclass
class AlphaGANOutput:
    """recon = G(E(x)) [B, C, *spatial]; code = E(x) [B, latent_dim];
    recon_score = D(recon) [B]; code_score = C(code) [B]."""

    recon: torch.Tensor
    code: torch.Tensor
    recon_score: torch.Tensor
    code_score: torch.Tensor


@register_model("alpha-gan")
class AlphaGAN(nn.Module):
    """Conditional alpha-GAN with `.encoder`, `.generator`, `.discriminator`, `.code_discriminator`.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        num_classes: number of classes.
        image_size: image edge length (4 * 2**n).
        base_width: width unit (64: published size; 8-16 on CPU).
        latent_dim: size of z (Kwon et al. use 1000 at base_width 64).
        upsample: generator upsampling, "transpose" or "nearest".
        g_norm: generator normalisation.
        e_norm: encoder normalisation.
        d_norm: image critic normalisation (layer | instance | none).
        code_hidden: hidden units of the code critic.
        conditional_encoder: whether E also sees the class (E(x, y)); False gives Kwon et al.'s E(x).
        class_prior: a class-conditional prior N(m_y, I) with learned means m_y (as the vae's `class_prior`):
            codes are standardised, E(x) - m_y, for the code critic and `encode`, and `sample` decodes z + m_y,
            so prior samples of class y start from its centroid; G(E(x)) is unchanged.
        class_offset: a learned full-resolution map per class added before the output tanh (see Generator).
        generator_output: "image" (voxels, DCGAN) or "warp" (a deformable template; see Generator).
        warp_size: the warp output's field grid edge (0: image_size / 2).
        max_displacement: the warp output's largest displacement (fraction of the half field of view).
        noise: learned observation noise on the generator's output (see Generator).
        sample_prior: "standard" or "fitted" (a per-class Gaussian over the training codes E(x); as the vae's).
        match_intensities: map samples, voxel by voxel in rank order, onto an intensity quantile function drawn
            from the class's training volumes, with their noise level (fitted by training's SamplePrior hook; see
            FittedIntensities).
        intensity_smooth: with match_intensities, the SD in voxels of a Gaussian that first smooths away the
            generator's own voxel-scale texture (speckle, checkerboards) inside the brain; 0: none.
        intensity_sharpen: with match_intensities, add back the samples' edge detail inside the brain with a gain
            fitted during training so that it matches the training volumes' (FittedIntensities.fit_gain).
    """

    compile_children = ("encoder", "generator")  # both critics stay eager (gradient penalties: double backward)

    def __init__(self, *, spatial_dims: int = 3, in_channels: int = 1, num_classes: int = 3, image_size: int = 64,
                 base_width: int = 8, latent_dim: int = 128, upsample: str = "transpose", g_norm: str = "batch",
                 e_norm: str = "batch", d_norm: str = "layer", code_hidden: int = 256,
                 conditional_encoder: bool = False, class_prior: bool = False, class_offset: bool = False,
                 generator_output: str = "image", warp_size: int = 0, max_displacement: float = 0.2,
                 noise: bool = False, sample_prior: str = "standard",
                 match_intensities: bool = False, intensity_smooth: float = 0.0,
                 intensity_sharpen: bool = False) -> None:
        super().__init__()
        check_common("model 'alpha-gan'", spatial_dims=spatial_dims, in_channels=in_channels,
                     num_classes=num_classes, image_size=image_size, base_width=base_width, latent_dim=latent_dim)
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.image_size = image_size
        self.in_channels = in_channels
        self.spatial_dims = spatial_dims
        self.encoder = Encoder(spatial_dims=spatial_dims, in_channels=in_channels,
                               num_classes=num_classes if conditional_encoder else 0, image_size=image_size,
                               base_width=base_width, out_features=latent_dim, norm=e_norm)
        self.generator, self.discriminator = generator_and_critic(
            spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes, image_size=image_size,
            base_width=base_width, latent_dim=latent_dim, upsample=upsample, g_norm=g_norm, d_norm=d_norm,
            class_offset=class_offset, output=generator_output, warp_size=warp_size,
            max_displacement=max_displacement, noise=noise)
        self.code_discriminator = CodeDiscriminator(latent_dim=latent_dim, hidden=code_hidden)
        self.code_prior = fitted_prior("model 'alpha-gan'", sample_prior, num_classes, latent_dim)
        self.intensity_prior = fitted_intensities(match_intensities, num_classes, intensity_smooth,
                                                   intensity_sharpen)
        self.prior = nn.Embedding(num_classes, latent_dim) if class_prior else None  # m_y, zero at the start
        if self.prior is not None:
            nn.init.zeros_(self.prior.weight)

    def prior_mean(self, labels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """m_y [B, latent_dim] for labels [B] (or class weights [B, K]); zeros without a class prior."""
        if self.prior is None:
            return torch.zeros_like(like)
        return embed_labels(self.prior, labels).to(like.dtype)

    def encode(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Deterministic code E(x) [B, latent_dim] (minus m_y with a class prior)."""
        code = self.encoder(x, labels)
        return code - self.prior_mean(labels, code) if self.prior is not None else code

    @property
    def observation_noise(self) -> bool:
        """Whether sample() takes observation noise (the generator's `noise` option)."""
        return self.generator.observation_noise

    def sample(self, z: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Decode (standardised) latents z [B, latent_dim] with labels [B] to images [B, C, *spatial] in [-1, 1]
        (noise: standard normal like the images, for the observation noise)."""
        if self.prior is not None:
            z = z + self.prior_mean(labels, z)
        return self.generator(z, labels, noise)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> AlphaGANOutput:
        """Reconstruct x through E and G and score reconstruction and code with both critics."""
        code = self.encode(x, labels)
        recon = self.sample(code, labels)
        return AlphaGANOutput(recon=recon, code=code, recon_score=self.discriminator(recon, labels),
                              code_score=self.code_discriminator(code))

    @classmethod
    def tiny_kwargs(cls, spatial_dims: int) -> dict[str, Any]:
        """Small constructor arguments for the model checklist test."""
        return dict(spatial_dims=spatial_dims, in_channels=1, num_classes=3, image_size=16, base_width=4,
                    latent_dim=8, code_hidden=16)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        """forward() keyword arguments for the checklist test (CPU tensors)."""
        shape = (batch_size, self.in_channels) + (self.image_size,) * self.spatial_dims
        return dict(x=torch.rand(shape, generator=generator) * 2 - 1,
                    labels=torch.arange(batch_size) % max(self.num_classes, 1))
