"""The networks the generative models share: argument checks, DCGAN generator, projection critic,
conv encoder and code critic. GAN composes generator + critic, VAE encoder + generator, alpha-GAN all four.
"""

from __future__ import annotations

import math

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


OUTPUTS = ("image", "warp")
# The warp generator's template moves this many times faster than Adam's per-step size (lr) would move a plain
# parameter: from the zero start to the background's pre-tanh level (about -3) in 1500 steps at 2e-4, while the
# random walk of noisy (critic) gradients stays small.
TEMPLATE_GAIN = 10.0
WARP_INIT_SCALE = 0.1  # the warp output's last conv starts at this fraction of its default initial weights
NOISE_INIT = 0.02  # the observation noise's starting sd (real phantom volumes: Rician noise, 1-4 % of WM)


def identity_grid(spatial_dims: int, size: int) -> torch.Tensor:
    """grid_sample's identity sampling grid [1, *S, D] (align_corners=True; the last entry indexes axis 0)."""
    axes = torch.linspace(-1.0, 1.0, size)
    coords = torch.stack(torch.meshgrid(*(axes,) * spatial_dims, indexing="ij"), dim=-1)  # [*S, D], axis order
    return coords.flip(-1).unsqueeze(0)  # grid_sample wants (x, y, z) = (last axis, ..., first axis)


class Generator(nn.Module):
    """Conditional DCGAN generator: latent [B, latent_dim] + labels [B] -> images [B, C, *spatial] in [-1, 1].

    Two outputs (`output`):
    - "image": the up-stages draw the image voxel by voxel (DCGAN);
    - "warp": a deformable template. The up-stages stop at a `warp_size` grid and draw a displacement field plus a
      multiplicative and an additive intensity field there; upsampled to the image (linearly) they warp one
      learned full-resolution template (bilinear sampling) and adjust its contrast. Why: the anatomy then keeps the
      template's sharp edges whatever the code, where a decoder drawing voxels averages misregistered edges into
      blur, and a subject is a smooth deformation of a common anatomy (atrophy is a local volume change), which
      is what a low-resolution displacement field describes. The last stage starts small: near the identity warp.

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
        output: "image" or "warp" (see above).
        warp_size: edge of the warp output's field grid (image_size / 2**j, >= 8; 0: image_size / 2).
        max_displacement: largest displacement of the warp output, as a fraction of the half field of view.
        noise: observation noise: `forward(..., noise=eps)` adds sigma * (1 + x) / 2 * eps to the output x, a
            learned sigma scaled by the brightness (zero on the -1 background, as brain-extracted scans). Why: a
            mean image has none of the scanner noise and texture of real volumes, which any real-vs-synthetic
            test sees at once. The critic sets sigma (gan, alpha-gan: the reconstruction loss sees the mean).
    """

    def __init__(self, *, spatial_dims: int = 3, in_channels: int = 1, num_classes: int = 3, image_size: int = 64,
                 base_width: int = 8, latent_dim: int = 128, upsample: str = "transpose",
                 norm: str = "batch", class_offset: bool = False, output: str = "image", warp_size: int = 0,
                 max_displacement: float = 0.2, noise: bool = False) -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise MedgenError(f"generator: output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        n = num_stages(image_size)
        self.spatial_dims = spatial_dims
        self.latent_dim = latent_dim
        self.output, self.image_size, self.max_displacement = output, image_size, max_displacement
        stop = 0  # stages are skipped below this one: the warp fields live on image_size / 2**stop
        if output == "warp":
            warp_size = warp_size or image_size // 2
            stop = round(math.log2(image_size / warp_size)) if warp_size > 0 else -1
            if warp_size < 8 or stop < 1 or warp_size * 2**stop != image_size:
                raise MedgenError(f"generator: warp_size must be image_size / 2**j with j >= 1 and >= 8, got "
                                  f"{warp_size} for image_size {image_size}")
            if not 0 < max_displacement <= 1:
                raise MedgenError(f"generator: max_displacement must be in (0, 1], got {max_displacement}")
        field_channels = spatial_dims + 2  # displacement per axis, log-gain, bias
        self.bottleneck_channels = stage_channels(base_width, n)
        self.fc = ClassConditionedLinear(in_features=latent_dim, out_features=self.bottleneck_channels
                                         * BOTTLENECK**spatial_dims, num_classes=num_classes)
        n_arg = norm_arg(norm, "generator")
        self.fc_norm = (nn.Identity() if n_arg is None else
                        get_norm_layer(n_arg, spatial_dims=spatial_dims, channels=self.bottleneck_channels))
        self.fc_act = nn.ReLU()
        stages = []
        for k in range(n, stop, -1):  # resolution image_size / 2**k -> image_size / 2**(k-1)
            last = k == stop + 1
            width = (field_channels if output == "warp" else in_channels) if last else stage_channels(base_width, k - 1)
            stages.append(UpBlock(spatial_dims=spatial_dims, in_channels=stage_channels(base_width, k),
                                  out_channels=width, upsample=upsample, norm="none" if last else norm,
                                  act=None if last else "relu"))
        self.stages = nn.Sequential(*stages)
        if output == "warp":
            final = self.stages[-1][-1].conv  # the last conv: small weights, zero bias: close to the identity warp
            with torch.no_grad():  # (not zero: the stages below would get no gradient, and the codes would be ignored)
                final.weight.mul_(WARP_INIT_SCALE)
                final.bias.zero_()
            self.template = nn.Parameter(torch.zeros(1, in_channels, *(image_size,) * spatial_dims))  # pre-tanh / gain
            self.register_buffer("grid", identity_grid(spatial_dims, image_size), persistent=False)
        if class_offset and num_classes < 1:
            raise MedgenError("generator: class_offset needs num_classes >= 1")
        # [K, C * S^d]: one pre-tanh map per class, looked up (or class-weighted) like an embedding
        self.offset = (nn.Embedding(num_classes, in_channels * image_size**spatial_dims) if class_offset
                       else None)
        if self.offset is not None:
            nn.init.zeros_(self.offset.weight)
        self.log_noise = nn.Parameter(torch.tensor(math.log(NOISE_INIT))) if noise else None

    @property
    def observation_noise(self) -> bool:
        """Whether forward() takes observation noise."""
        return self.log_noise is not None

    def add_noise(self, images: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """images + sigma * (1 + images) / 2 * eps (unchanged without observation noise)."""
        if self.log_noise is None:
            return images
        return images + self.log_noise.exp().to(images.dtype) * (1 + images) / 2 * eps.to(images.dtype)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Latents z [B, latent_dim] and labels [B] (or class weights [B, K]) -> images [B, C, *S]; noise: standard
        normal like the images for the observation noise (None: the mean image)."""
        h = self.fc(z, labels)
        # [B, C * 4^d] -> [B, C, 4, ...]
        h = h.view(z.shape[0], self.bottleneck_channels, *(BOTTLENECK,) * self.spatial_dims)
        h = self.fc_act(self.fc_norm(h))
        out = self.stages(h)
        if self.output == "warp":
            out = self.warp(out).to(out.dtype)
        if self.offset is not None:
            out = out + embed_labels(self.offset, labels).to(out.dtype).view_as(out)  # [B, C*S^d] -> [B, C, *S]
        out = torch.tanh(out)
        return out if noise is None else self.add_noise(out, noise)

    def warp(self, fields: torch.Tensor) -> torch.Tensor:
        """Fields [B, D + 2, *W] -> the warped, contrast-adjusted template [B, C, *S] (pre-tanh, float32)."""
        d = self.spatial_dims
        mode = "trilinear" if d == 3 else "bilinear"
        fields = nn.functional.interpolate(fields.float(), size=(self.image_size,) * d, mode=mode, align_corners=True)
        # [B, D, *S] -> [B, *S, D]: displacement in grid_sample's normalised coordinates
        disp = self.max_displacement * torch.tanh(fields[:, :d]).movedim(1, -1)
        template = (TEMPLATE_GAIN * self.template.float()).expand(fields.shape[0], *self.template.shape[1:])
        warped = nn.functional.grid_sample(template, self.grid.float() + disp, mode="bilinear",
                                           padding_mode="border", align_corners=True)
        return warped * torch.exp(fields[:, d : d + 1]) + fields[:, d + 1 : d + 2]


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
                         latent_dim: int, upsample: str, g_norm: str, d_norm: str, class_offset: bool = False,
                         output: str = "image", warp_size: int = 0, max_displacement: float = 0.2,
                         noise: bool = False) -> tuple[Generator, Discriminator]:
    """The generator and the image critic of a GAN-style model (built in this order: same init RNG draws)."""
    generator = Generator(spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes,
                          image_size=image_size, base_width=base_width, latent_dim=latent_dim,
                          upsample=upsample, norm=g_norm, class_offset=class_offset, output=output,
                          warp_size=warp_size, max_displacement=max_displacement, noise=noise)
    discriminator = Discriminator(spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes,
                                  image_size=image_size, base_width=base_width, norm=d_norm)
    return generator, discriminator
