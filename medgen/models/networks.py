"""The networks the generative models share: argument checks, DCGAN generator, projection critic,
conv encoder and code critic. GAN composes generator + critic, VAE encoder + generator, alpha-GAN all four.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers.utils import get_norm_layer
from torch import nn

from medgen.errors import MedgenError
from medgen.models.blocks import (
    BOTTLENECK,
    ClassConditionedLinear,
    DownTrunk,
    ProjectionHead,
    UpBlock,
    embed_labels,
    norm_arg,
    num_stages,
    stage_channels,
)


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
        class_offset: add a learned full-resolution map per class before the output tanh (zero at the start).
            Why: a class effect that is small beside the anatomy's variation (atrophy in a few regions) is
            one gradient step away in the map, where through the bottleneck it is lost in the reconstruction.
    """

    def __init__(self, *, spatial_dims: int = 3, in_channels: int = 1, num_classes: int = 3, image_size: int = 64,
                 base_width: int = 8, latent_dim: int = 128, upsample: str = "transpose",
                 norm: str = "batch", class_offset: bool = False) -> None:
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
        if class_offset and num_classes < 1:
            raise MedgenError("generator: class_offset needs num_classes >= 1")
        # [K, C * S^d]: one pre-tanh map per class, looked up (or class-weighted) like an embedding
        self.offset = (nn.Embedding(num_classes, in_channels * image_size**spatial_dims) if class_offset
                       else None)
        if self.offset is not None:
            nn.init.zeros_(self.offset.weight)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        h = self.fc(z, labels)
        # [B, C * 4^d] -> [B, C, 4, ...]
        h = h.view(z.shape[0], self.bottleneck_channels, *(BOTTLENECK,) * self.spatial_dims)
        h = self.fc_act(self.fc_norm(h))
        out = self.stages(h)
        if self.offset is not None:
            out = out + embed_labels(self.offset, labels).to(out.dtype).view_as(out)  # [B, C*S^d] -> [B, C, *S]
        return torch.tanh(out)


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


class Encoder(nn.Module):
    """Conditional conv encoder: images [B, C, *spatial] + labels [B] -> features [B, out_features].

    k4 s2 convs down to 4^d, then a full-size conv (a linear layer on the flattened 4^d map) plus a
    class embedding, i.e. a linear layer on [features, one_hot(label)].

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        num_classes: number of classes (0: unconditional).
        image_size: input edge length.
        base_width: channels after the first conv.
        out_features: output size (2 * latent_dim for a VAE, latent_dim for alpha-GAN).
        norm: normalisation of the conv blocks.
    """

    def __init__(self, *, spatial_dims: int = 3, in_channels: int = 1, num_classes: int = 3, image_size: int = 64,
                 base_width: int = 8, out_features: int = 256, norm: str = "batch") -> None:
        super().__init__()
        self.trunk = DownTrunk(spatial_dims=spatial_dims, in_channels=in_channels, image_size=image_size,
                               base_width=base_width, norm=norm)
        self.head = Convolution(spatial_dims, self.trunk.out_channels, out_features, kernel_size=BOTTLENECK,
                                padding=0, conv_only=True)
        self.embed = nn.Embedding(num_classes, out_features) if num_classes > 0 else None
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, std=0.02)
        self.out_features = out_features

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        out = self.head(self.trunk(x)).reshape(x.shape[0], self.out_features)  # [B, F, 1, ...] -> [B, F]
        if self.embed is not None:
            out = out + self.embed(labels)
        return out


class CodeDiscriminator(nn.Module):
    """MLP critic on latent codes: z [B, latent_dim] -> scores [B].

    Args:
        latent_dim: size of z.
        hidden: hidden units per layer.
        depth: number of hidden layers.
    """

    def __init__(self, *, latent_dim: int = 128, hidden: int = 256, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = latent_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.LeakyReLU(0.2)]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).squeeze(1)  # [B, 1] -> [B]


def generator_and_critic(*, spatial_dims: int, in_channels: int, num_classes: int, image_size: int, base_width: int,
                         latent_dim: int, upsample: str, g_norm: str, d_norm: str,
                         class_offset: bool = False) -> tuple[Generator, Discriminator]:
    """The generator and the image critic of a GAN-style model (built in this order: same init RNG draws)."""
    generator = Generator(spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes,
                          image_size=image_size, base_width=base_width, latent_dim=latent_dim,
                          upsample=upsample, norm=g_norm, class_offset=class_offset)
    discriminator = Discriminator(spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes,
                                  image_size=image_size, base_width=base_width, norm=d_norm)
    return generator, discriminator
