"""The 3D (or 2D) image classifier trained by cv-evaluate: a small MONAI network plus a linear head.

Backbones (MONAI networks and blocks): "resnet18" (ResNet, basic blocks [2, 2, 2, 2], widths
base_width * [1, 2, 4, 8]), "densenet121" (DenseNet, growth rate base_width), "simple" (MONAI's
residual-unit Classifier trunk) and "plain" (a VGG-style stack of MONAI conv-BatchNorm-ReLU blocks: four
stride-2 stages, widths base_width * [1, 2, 4, 8], the last three each followed by a stride-1 block; no
max-pool stem, so small structures survive on coarse CPU grids). The backbone returns pooled features;
dropout and one linear layer give the class logits, so `forward` can return both.
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
from medgen.models.registry import register_model

BACKBONES = ("resnet18", "densenet121", "simple", "plain")


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
    """A stride-2 conv, then three stages of [conv3 stride 2, conv3 stride 1], each conv -> BatchNorm -> ReLU;
    global average pooling."""

    def __init__(self, spatial_dims: int, in_channels: int, base_width: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c in enumerate((base_width, 2 * base_width, 4 * base_width, 8 * base_width)):
            # The first stage is one strided conv: a stride-1 conv on the largest grid would double the cost.
            for stride in (2,) if i == 0 else (2, 1):
                layers.append(Convolution(spatial_dims, c_in, c, strides=stride, kernel_size=3, act="relu",
                                          norm="batch"))
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
    """

    def __init__(self, *, spatial_dims: int = 3, in_channels: int = 1, num_classes: int = 3,
                 image_size: int = 64, base_width: int = 8, backbone: str = "resnet18",
                 dropout: float = 0.0) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise MedgenError(f"classifier backbone must be one of {', '.join(BACKBONES)}, got {backbone!r}")
        if spatial_dims not in (2, 3):
            raise MedgenError(f"classifier spatial_dims must be 2 or 3, got {spatial_dims}")
        if num_classes < 2:
            raise MedgenError(f"classifier needs at least 2 classes, got num_classes={num_classes}")
        self.num_classes = num_classes
        if backbone == "resnet18":
            self.backbone, n_features = _resnet18(spatial_dims, in_channels, base_width)
        elif backbone == "densenet121":
            self.backbone, n_features = _densenet121(spatial_dims, in_channels, base_width)
        elif backbone == "simple":
            trunk = _SimpleTrunk(spatial_dims, in_channels, image_size, base_width)
            self.backbone, n_features = trunk, trunk.n_features
        else:
            plain = _PlainTrunk(spatial_dims, in_channels, base_width)
            self.backbone, n_features = plain, plain.n_features
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(n_features, num_classes)

    def forward(self, x: torch.Tensor) -> ClassifierOutput:
        features = self.backbone(x)  # [B, F]
        return ClassifierOutput(logits=self.head(self.dropout(features)), features=features)

    @classmethod
    def tiny_kwargs(cls, spatial_dims: int = 3) -> dict[str, Any]:
        """Small settings for fast tests (16^3 volumes or 32^2 images)."""
        return {"spatial_dims": spatial_dims, "in_channels": 1, "num_classes": 3,
                "image_size": 16 if spatial_dims == 3 else 32, "base_width": 2, "backbone": "resnet18"}
