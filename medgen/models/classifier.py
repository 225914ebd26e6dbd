"""The 3D (or 2D) image classifier trained by cv-evaluate: a small MONAI network plus a linear head.

Backbones (MONAI networks and blocks): "resnet18" (ResNet, basic blocks [2, 2, 2, 2], widths
base_width * [1, 2, 4, 8]), "densenet121" (DenseNet, growth rate base_width), "simple" (MONAI's
residual-unit Classifier trunk) and "plain" (a VGG-style stack of MONAI conv-BatchNorm-ReLU blocks: four
stride-2 stages, widths base_width * [1, 2, 4, 8], the last three each followed by a stride-1 block; no
max-pool stem, so small structures survive on coarse CPU grids). The backbone returns pooled features;
dropout and one linear layer give the class logits, so `forward` can return both.

`standardize=True` gives the backbone a second input channel per image channel: the voxelwise standardised
image (x - mean) / std with per-voxel statistics of the training set (`set_input_statistics`, stored as
buffers so a checkpoint carries them). For registered volumes this hands the network each subject's
deviation from the average anatomy, which a translation-equivariant CNN with global pooling cannot
otherwise locate (on the phantom, fold 0, 64^3: test balanced accuracy 0.52 -> 0.60, AUC 0.65 -> 0.75).
`coords=True` adds one coordinate channel per axis (CoordConv) for the same reason (phantom, 32^3, folds
0-2, 24 epochs: 0.51 -> 0.54).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import Classifier as MonaiClassifier
from monai.networks.nets import DenseNet, ResNet
from torch import nn

from medgen.errors import MedgenError
from medgen.models.blocks import NORMS, norm_arg
from medgen.models.registry import register_model

BACKBONES = ("resnet18", "densenet121", "simple", "plain")


def _norm(norm: str) -> str | tuple | None:
    """MONAI norm argument of the plain trunk: blocks.norm_arg, except that instance norm stays non-affine
    (as the classifier has always had it; its checkpoints hold no affine parameters). "layer" (GroupNorm, one
    group) keeps each channel's magnitude relative to the others, which instance norm removes before pooling."""
    return "instance" if norm == "instance" else norm_arg(norm, "classifier")


@dataclass
class ClassifierOutput:
    """logits: [B, num_classes] unnormalised class scores; features: [B, F] pooled backbone features."""

    logits: torch.Tensor
    features: torch.Tensor


def _resnet18(spatial_dims: int, in_channels: int, base_width: int) -> tuple[nn.Module, int]:
    widths = [base_width, 2 * base_width, 4 * base_width, 8 * base_width]
    # Stride-2 stem plus max-pool: 64^3 is reduced to 16^3 before the first block (cheap on CPU).
    net = ResNet(block="basic", layers=[2, 2, 2, 2], block_inplanes=widths, spatial_dims=spatial_dims,
                 n_input_channels=in_channels, conv1_t_size=7, conv1_t_stride=2, feed_forward=False)
    return net, widths[-1]


def _densenet121(spatial_dims: int, in_channels: int, base_width: int) -> tuple[nn.Module, int]:
    net = DenseNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=1,
                   init_features=2 * base_width, growth_rate=base_width, block_config=(6, 12, 24, 16))
    n_features = net.class_layers.out.in_features
    net.class_layers.out = nn.Identity()  # keep relu -> global pool -> flatten; the head is ours
    return net, n_features


class _SimpleTrunk(nn.Module):
    """MONAI Classifier's strided residual units, flattened (its own final layer is dropped)."""

    def __init__(self, spatial_dims: int, in_channels: int, image_size: int, base_width: int) -> None:
        super().__init__()
        channels = [base_width, 2 * base_width, 4 * base_width, 8 * base_width]
        full = MonaiClassifier(in_shape=[in_channels] + [image_size] * spatial_dims, classes=2,
                               channels=channels, strides=[2, 2, 2, 2], num_res_units=1)
        self.net = full.net
        self.pool = nn.AdaptiveAvgPool3d(1) if spatial_dims == 3 else nn.AdaptiveAvgPool2d(1)
        self.n_features = channels[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.net(x)).flatten(1)  # [B, C, *s] -> [B, C]


class _PlainTrunk(nn.Module):
    """A stride-2 conv, then three stages of [conv3 stride 2, conv3 stride 1], each conv -> norm -> ReLU;
    global average pooling."""

    def __init__(self, spatial_dims: int, in_channels: int, base_width: int, norm: str = "batch") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c in enumerate((base_width, 2 * base_width, 4 * base_width, 8 * base_width)):
            # The first stage is one strided conv: a stride-1 conv on the largest grid would double the cost.
            for stride in (2,) if i == 0 else (2, 1):
                layers.append(Convolution(spatial_dims, c_in, c, strides=stride, kernel_size=3, act="relu",
                                          norm=_norm(norm)))
                c_in = c
        self.net = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool3d(1) if spatial_dims == 3 else nn.AdaptiveAvgPool2d(1)
        self.n_features = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.net(x)).flatten(1)  # [B, C, *s] -> [B, C]


@register_model("classifier")
class Classifier(nn.Module):
    """Image classifier: MONAI backbone -> pooled features -> dropout -> linear logits.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        num_classes: number of classes (2 or more).
        image_size: edge length of the (square/cubic) input; used by the "simple" backbone.
        base_width: width of the first stage (ResNet widths base_width * [1, 2, 4, 8]).
        backbone: one of resnet18, densenet121, simple, plain (not `name`: create_model takes that positionally).
        dropout: dropout probability before the linear head.
        norm: normalisation layer of the plain backbone: batch, instance, layer (GroupNorm, one group) or none.
        standardize: standardise the input voxelwise with training-set statistics (see the module doc).
        coords: append one channel per spatial axis holding the voxel's coordinate in [-1, 1] (CoordConv), so
            convolutions can tell where they are (global pooling otherwise discards it).
    """

    def __init__(self, *, spatial_dims: int = 3, in_channels: int = 1, num_classes: int = 3,
                 image_size: int = 64, base_width: int = 8, backbone: str = "resnet18",
                 dropout: float = 0.0, norm: str = "batch", standardize: bool = False, coords: bool = False) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise MedgenError(f"classifier backbone must be one of {', '.join(BACKBONES)}, got {backbone!r}")
        if norm not in NORMS:
            raise MedgenError(f"classifier norm must be one of {', '.join(NORMS)}, got {norm!r}")
        if norm != "batch" and backbone != "plain":
            raise MedgenError(f"classifier norm {norm!r} is only available for the plain backbone")
        if spatial_dims not in (2, 3):
            raise MedgenError(f"classifier spatial_dims must be 2 or 3, got {spatial_dims}")
        if num_classes < 2:
            raise MedgenError(f"classifier needs at least 2 classes, got num_classes={num_classes}")
        self.num_classes = num_classes
        n_in = in_channels
        # the input the model expects (runtime.bf16_conv_hazards probes it; medgen/models/protocol.py)
        self.in_channels, self.image_size, self.spatial_dims = n_in, image_size, spatial_dims
        in_channels = 2 * in_channels if standardize else in_channels  # [x, standardised x]
        in_channels += spatial_dims if coords else 0  # [..., coordinate per axis]
        if backbone == "resnet18":
            self.backbone, n_features = _resnet18(spatial_dims, in_channels, base_width)
        elif backbone == "densenet121":
            self.backbone, n_features = _densenet121(spatial_dims, in_channels, base_width)
        elif backbone == "simple":
            trunk = _SimpleTrunk(spatial_dims, in_channels, image_size, base_width)
            self.backbone, n_features = trunk, trunk.n_features
        else:
            plain = _PlainTrunk(spatial_dims, in_channels, base_width, norm)
            self.backbone, n_features = plain, plain.n_features
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(n_features, num_classes)
        self.standardize = standardize
        if standardize:
            grid = (1, n_in) + (image_size,) * spatial_dims
            self.register_buffer("input_mean", torch.zeros(grid))
            self.register_buffer("input_std", torch.ones(grid))
        self.coords = coords
        if coords:
            axes = torch.meshgrid(*[torch.linspace(-1.0, 1.0, image_size)] * spatial_dims, indexing="ij")
            self.register_buffer("grid", torch.stack(axes)[None], persistent=False)  # [1, spatial_dims, *s]

    @torch.no_grad()
    def set_input_statistics(self, images: torch.Tensor, floor: float = 0.05) -> None:
        """Set the voxelwise standardisation from training images [N, C, *spatial] (standardize=True only).

        Args:
            images: the training set (nothing from validation or test subjects).
            floor: added to the SD so that near-constant voxels (background) are not amplified.
        """
        if not self.standardize:
            raise MedgenError("set_input_statistics needs a classifier built with standardize=True")
        if tuple(images.shape[1:]) != tuple(self.input_mean.shape[1:]):
            raise MedgenError(f"classifier input statistics: expected images of shape [N, "
                              f"{', '.join(map(str, self.input_mean.shape[1:]))}], got {list(images.shape)}")
        x = images.float()
        self.input_mean.copy_(x.mean(0, keepdim=True).to(self.input_mean.device))
        self.input_std.copy_((x.std(0, keepdim=True) + floor).to(self.input_std.device))

    def forward(self, x: torch.Tensor) -> ClassifierOutput:
        if self.standardize:
            x = torch.cat([x, (x - self.input_mean) / self.input_std], dim=1)  # [B, 2C, *s]
        if self.coords:
            x = torch.cat([x, self.grid.to(x.dtype).expand(len(x), *self.grid.shape[1:])], dim=1)  # [B, C + D, *s]
        features = self.backbone(x)  # [B, F]
        return ClassifierOutput(logits=self.head(self.dropout(features)), features=features)

    @classmethod
    def tiny_kwargs(cls, spatial_dims: int = 3) -> dict[str, Any]:
        """Small settings for fast tests (16^3 volumes or 32^2 images)."""
        return {"spatial_dims": spatial_dims, "in_channels": 1, "num_classes": 3,
                "image_size": 16 if spatial_dims == 3 else 32, "base_width": 2, "backbone": "resnet18"}
