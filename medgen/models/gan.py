"""Conditional DCGAN-style generator and projection critic (the 3dbraingen layout), registered as "gan".

Generator: [z, class] -> linear -> 4^d x (8 * base_width at 64^d) -> log2(image_size / 4) x2 stages
-> tanh. Critic: k4 s2 convs down to 4^d -> a scalar per sample plus a class projection term.
Trained with WGAN-GP (training/steps/gan.py), so the critic uses layer/instance norm, never batch norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medgen.models.blocks import fitted_intensities
from medgen.models.networks import check_common, generator_and_critic
from medgen.models.registry import register_model


@dataclass
class GANOutput:
    """images: G(z, labels) [B, C, *spatial]; score: critic score of those images [B]."""

    images: torch.Tensor
    score: torch.Tensor


@register_model("gan")
class GAN(nn.Module):
    """Conditional WGAN-GP GAN: `.generator` (DCGAN, 3dbraingen layout) and `.discriminator` (projection critic).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        num_classes: number of classes.
        image_size: image edge length (4 * 2**n; 64 gives four x2 stages).
        base_width: width unit (64: published size; 8-16 on CPU).
        latent_dim: size of z.
        upsample: generator upsampling, "transpose" or "nearest".
        g_norm: generator normalisation (batch | instance | layer | none).
        d_norm: critic normalisation (layer | instance | none).
        class_offset: a learned full-resolution map per class added before the output tanh (see Generator).
        generator_output: "image" (voxels, DCGAN) or "warp" (a deformable template; see Generator).
        warp_size: the warp output's field grid edge (0: image_size / 2).
        max_displacement: the warp output's largest displacement (fraction of the half field of view).
        noise: learned observation noise on the generator's output (see Generator).
        match_intensities: map samples, voxel by voxel in rank order, onto an intensity quantile function drawn
            from the class's training volumes, with their noise level (fitted by training's SamplePrior hook; see
            FittedIntensities).
        intensity_smooth: with match_intensities, the SD in voxels of a Gaussian that first smooths away the
            generator's own voxel-scale texture (speckle, checkerboards) inside the brain; 0: none.
        intensity_sharpen: with match_intensities, add back the samples' edge detail inside the brain with a gain
            fitted during training so that it matches the training volumes' (FittedIntensities.fit_gain).
    """

    compile_children = ("generator",)  # the critic stays eager (gradient penalty: double backward)

    def __init__(self, *, spatial_dims: int = 3, in_channels: int = 1, num_classes: int = 3, image_size: int = 64,
                 base_width: int = 8, latent_dim: int = 128, upsample: str = "transpose", g_norm: str = "batch",
                 d_norm: str = "layer", class_offset: bool = False,
                 generator_output: str = "image", warp_size: int = 0, max_displacement: float = 0.2,
                 noise: bool = False, match_intensities: bool = False, intensity_smooth: float = 0.0,
                 intensity_sharpen: bool = False) -> None:
        super().__init__()
        check_common("model 'gan'", spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes,
                     image_size=image_size, base_width=base_width, latent_dim=latent_dim)
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.generator, self.discriminator = generator_and_critic(
            spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes, image_size=image_size,
            base_width=base_width, latent_dim=latent_dim, upsample=upsample, g_norm=g_norm, d_norm=d_norm,
            class_offset=class_offset, output=generator_output, warp_size=warp_size,
            max_displacement=max_displacement, noise=noise)
        self.intensity_prior = fitted_intensities(match_intensities, num_classes, intensity_smooth,
                                                   intensity_sharpen)

    @property
    def observation_noise(self) -> bool:
        """Whether sample() takes observation noise (the generator's `noise` option)."""
        return self.generator.observation_noise

    def sample(self, z: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Decode latents z [B, latent_dim] with labels [B] to images [B, C, *spatial] in [-1, 1]
        (noise: standard normal like the images, for the observation noise)."""
        return self.generator(z, labels, noise)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> GANOutput:
        """Generate from z and score the result with the critic (the whole model in one pass)."""
        images = self.generator(z, labels)
        return GANOutput(images=images, score=self.discriminator(images, labels))

    @classmethod
    def tiny_kwargs(cls, spatial_dims: int) -> dict[str, Any]:
        """Small constructor arguments for the model checklist test."""
        return dict(spatial_dims=spatial_dims, in_channels=1, num_classes=3, image_size=16, base_width=4,
                    latent_dim=8)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """forward() keyword arguments for the checklist test (CPU tensors)."""
        return dict(z=torch.randn(batch_size, self.latent_dim, generator=generator),
                    labels=torch.arange(batch_size) % max(self.num_classes, 1))
