"""Conditional DCGAN-style generator and projection critic (the 3dbraingen layout), registered as "gan".

Generator: [z, class] -> linear -> 4^d x (8 * base_width at 64^d) -> log2(image_size / 4) x2 stages
-> tanh. Critic: k4 s2 convs down to 4^d -> a scalar per sample plus a class projection term.
Trained with WGAN-GP (training/steps/gan.py), so the critic uses layer/instance norm, never batch norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from monai.networks.layers.utils import get_norm_layer
from torch import nn

from medgen.errors import MedgenError
from medgen.models.blocks import (
    BOTTLENECK,
    ClassConditionedLinear,
    DownTrunk,
    ProjectionHead,
    UpBlock,
    norm_arg,
    num_stages,
    stage_channels,
)
from medgen.models.registry import register_model


def check_common(what: str, *, spatial_dims: int, in_channels: int, num_classes: int, image_size: int,
                 base_width: int, latent_dim: int) -> None:
    """One-line errors for impossible shape arguments (shared by the generative models)."""
    if spatial_dims not in (2, 3):
        raise MedgenError(f"{what}: spatial_dims must be 2 or 3, got {spatial_dims}")
    for key, value in (("in_channels", in_channels), ("base_width", base_width), ("latent_dim", latent_dim)):
        if value < 1:
            raise MedgenError(f"{what}: {key} must be >= 1, got {value}")
    if num_classes < 0:
        raise MedgenError(f"{what}: num_classes must be >= 0, got {num_classes}")
    num_stages(image_size, what)


class Generator(nn.Module):
    """Conditional DCGAN generator: latent [B, latent_dim] + labels [B] -> images [B, C, *spatial] in [-1, 1].

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        num_classes: number of classes (0: unconditional).
        image_size: output edge length (4 * 2**n).
        base_width: channels of the last hidden stage (64: the published 64^3 generator).
        latent_dim: size of z.
        upsample: "transpose" or "nearest" (upsample + conv).
        norm: normalisation of the hidden stages (batch in DCGAN).
    """

    def __init__(self, *, spatial_dims: int = 3, in_channels: int = 1, num_classes: int = 3, image_size: int = 64,
                 base_width: int = 8, latent_dim: int = 128, upsample: str = "transpose",
                 norm: str = "batch") -> None:
        super().__init__()
        n = num_stages(image_size)
        self.spatial_dims = spatial_dims
        self.latent_dim = latent_dim
        self.bottleneck_channels = stage_channels(base_width, n)
        self.fc = ClassConditionedLinear(in_features=latent_dim, out_features=self.bottleneck_channels
                                         * BOTTLENECK**spatial_dims, num_classes=num_classes)
        n_arg = norm_arg(norm, "generator")
        self.fc_norm = (nn.Identity() if n_arg is None else
                        get_norm_layer(n_arg, spatial_dims=spatial_dims, channels=self.bottleneck_channels))
        self.fc_act = nn.ReLU()
        stages = []
        for k in range(n, 0, -1):  # resolution image_size / 2**k -> image_size / 2**(k-1)
            last = k == 1
            stages.append(UpBlock(spatial_dims=spatial_dims, in_channels=stage_channels(base_width, k),
                                  out_channels=in_channels if last else stage_channels(base_width, k - 1),
                                  upsample=upsample, norm="none" if last else norm,
                                  act=None if last else "relu"))
        self.stages = nn.Sequential(*stages)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        h = self.fc(z, labels)
        # [B, C * 4^d] -> [B, C, 4, ...]
        h = h.view(z.shape[0], self.bottleneck_channels, *(BOTTLENECK,) * self.spatial_dims)
        h = self.fc_act(self.fc_norm(h))
        return torch.tanh(self.stages(h))


class Discriminator(nn.Module):
    """Projection critic: images [B, C, *spatial] + labels [B] -> scores [B] (unbounded, WGAN critic).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        num_classes: number of classes (0: no projection term).
        image_size: input edge length.
        base_width: channels after the first conv.
        norm: layer | instance | none (batch norm breaks the per-sample gradient penalty).
    """

    def __init__(self, *, spatial_dims: int = 3, in_channels: int = 1, num_classes: int = 3, image_size: int = 64,
                 base_width: int = 8, norm: str = "layer") -> None:
        super().__init__()
        if norm == "batch":
            raise MedgenError("discriminator: norm 'batch' is not allowed with a gradient penalty; "
                              "use layer, instance or none")
        self.trunk = DownTrunk(spatial_dims=spatial_dims, in_channels=in_channels, image_size=image_size,
                               base_width=base_width, norm=norm)
        self.head = ProjectionHead(spatial_dims=spatial_dims, in_channels=self.trunk.out_channels,
                                   num_classes=num_classes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.head(self.trunk(x), labels)


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
    """

    def __init__(self, *, spatial_dims: int = 3, in_channels: int = 1, num_classes: int = 3, image_size: int = 64,
                 base_width: int = 8, latent_dim: int = 128, upsample: str = "transpose", g_norm: str = "batch",
                 d_norm: str = "layer") -> None:
        super().__init__()
        check_common("model 'gan'", spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes,
                     image_size=image_size, base_width=base_width, latent_dim=latent_dim)
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.generator = Generator(spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes,
                                   image_size=image_size, base_width=base_width, latent_dim=latent_dim,
                                   upsample=upsample, norm=g_norm)
        self.discriminator = Discriminator(spatial_dims=spatial_dims, in_channels=in_channels,
                                           num_classes=num_classes, image_size=image_size, base_width=base_width,
                                           norm=d_norm)

    def sample(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Decode latents z [B, latent_dim] with labels [B] to images [B, C, *spatial] in [-1, 1]."""
        return self.generator(z, labels)

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
