"""Classical augmentation (translate, rotate in the axial plane), defined in millimetres.

A random draw (AugmentDraw, from a seeded generator) followed by a deterministic transform of the image,
so a batch is augmented the same way on any device and in any number of workers.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class AugmentDraw:
    """Parameters drawn for one image: shifts per axis in voxels (fractional on grids coarser than the study's
    3 mm) and an in-plane angle (radians)."""

    shift: tuple[float, ...]
    angle: float

    @property
    def identity(self) -> bool:
        return not any(self.shift) and self.angle == 0.0


@dataclass
class ClassicalAugmentation:
    """The reference study's augmentation: random translation and axial-plane rotation.

    With probability p_translate the image is shifted; then each axis independently (probability p_axis) in a
    random direction by a distance drawn uniformly from min_shift_mm, min_shift_mm + step_mm, ..., max_shift_mm
    (the study's 1-4 voxels of 3 mm: 3, 6, 9 or 12 mm), converted to voxels of spacing_mm: whole voxels at 3 mm
    (and 1 mm: 3-12 voxels), half voxels at 6 mm (0.5-2), so the augmentation moves anatomy by the same
    millimetres on every grid. With probability p_rotate it is rotated by an angle
    uniform in +-max_degrees in the axial plane (axes 0-1, R-A, of a RAS volume; the image plane in 2D).
    Parameters are drawn from a torch.Generator, then applied by a deterministic MONAI Affine (one trilinear
    resampling, border padding so the background stays background; a whole-voxel shift alone is exact).

    Args:
        spatial_dims: 2 or 3.
        p_translate: probability of translating an image.
        p_axis: probability of shifting along each axis, given a translation.
        min_shift_mm, max_shift_mm: shift size range in millimetres.
        step_mm: spacing of the shift sizes in millimetres (the study's voxel size).
        spacing_mm: voxel size of the images (the training grid's).
        p_rotate: probability of rotating an image.
        max_degrees: largest rotation angle.
    """

    spatial_dims: int = 3
    p_translate: float = 0.95
    p_axis: float = 0.66
    min_shift_mm: float = 3.0
    max_shift_mm: float = 12.0
    step_mm: float = 3.0
    spacing_mm: float = 3.0
    p_rotate: float = 0.90
    max_degrees: float = 6.0

    def __post_init__(self) -> None:
        if not (0 < self.min_shift_mm <= self.max_shift_mm and self.spacing_mm > 0 and self.step_mm > 0):
            raise ValueError(f"augmentation needs 0 < min_shift_mm <= max_shift_mm and spacing_mm, step_mm > 0, got "
                             f"{self.min_shift_mm}, {self.max_shift_mm}, {self.spacing_mm}, {self.step_mm}")

    @property
    def shift_sizes_mm(self) -> tuple[float, ...]:
        """The shift distances drawn from, in millimetres (3, 6, 9, 12 by default)."""
        n = int((self.max_shift_mm - self.min_shift_mm) / self.step_mm + 1e-9) + 1
        return tuple(self.min_shift_mm + i * self.step_mm for i in range(n))

    @property
    def shift_sizes(self) -> tuple[float, ...]:
        """The shift distances in voxels of spacing_mm (fractional on grids coarser than step_mm)."""
        return tuple(mm / self.spacing_mm for mm in self.shift_sizes_mm)

    def draw(self, generator: torch.Generator) -> AugmentDraw:
        """Draw one image's parameters (always the same number of random numbers, so streams stay aligned)."""
        d = self.spatial_dims
        u = torch.rand(3 + 3 * d, generator=generator, device=generator.device).tolist()
        translate, rotate, angle_u = u[0], u[1], u[2]
        axis_u, size_u, sign_u = u[3:3 + d], u[3 + d:3 + 2 * d], u[3 + 2 * d:3 + 3 * d]
        shift = [0.0] * d
        if translate < self.p_translate:
            sizes = self.shift_sizes
            for a in range(d):
                if axis_u[a] < self.p_axis:
                    magnitude = sizes[min(int(size_u[a] * len(sizes)), len(sizes) - 1)]
                    shift[a] = magnitude if sign_u[a] < 0.5 else -magnitude
        angle = 0.0
        if rotate < self.p_rotate:
            angle = math.radians((2.0 * angle_u - 1.0) * self.max_degrees)
        return AugmentDraw(shift=tuple(shift), angle=angle)

    def apply(self, image: torch.Tensor, params: AugmentDraw) -> torch.Tensor:
        """Apply drawn parameters to one image [C, *spatial] (deterministic)."""
        from monai.transforms import Affine

        if params.identity:
            return image
        rotate = (0.0, 0.0, params.angle) if self.spatial_dims == 3 else params.angle
        affine = Affine(rotate_params=rotate, translate_params=[float(s) for s in params.shift],
                        mode="bilinear", padding_mode="border", image_only=True, device=image.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = affine(image)
        out = out.as_tensor() if hasattr(out, "as_tensor") else out
        return out.to(device=image.device, dtype=image.dtype)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a batch [B, C, *spatial]; each image gets its own draw. Returns a new tensor."""
        if images.ndim != self.spatial_dims + 2:
            raise ValueError(f"expected [B, C, {'D, H, W' if self.spatial_dims == 3 else 'H, W'}], "
                             f"got shape {tuple(images.shape)}")
        with torch.no_grad():
            return torch.stack([self.apply(img, self.draw(generator)) for img in images])


_DEFAULT_3D = ClassicalAugmentation(spatial_dims=3)
_DEFAULT_2D = ClassicalAugmentation(spatial_dims=2)


def classical_augmentation(spatial_dims: int = 3, **kwargs: Any) -> ClassicalAugmentation:
    """The reference study's classical augmentation (see ClassicalAugmentation).

    Args:
        spatial_dims: 2 or 3.
        **kwargs: other ClassicalAugmentation fields.
    """
    return ClassicalAugmentation(spatial_dims=spatial_dims, **kwargs)


def augment_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Classical augmentation of a batch [B, 1, D, H, W] (or [B, C, H, W]); deterministic given the generator."""
    aug = _DEFAULT_2D if images.ndim == 4 else _DEFAULT_3D
    return aug(images, generator)


def augment_training_batch(batch: Any, generator: torch.Generator) -> Any:
    """fit()'s `transform` hook: a copy of a training Batch with augmented images, same labels (3 mm grid)."""
    return dataclasses.replace(batch, images=augment_batch(batch.images, generator))


@dataclass
class TrainingAugmentation:
    """fit()'s `transform` hook: optional left-right flips, then optional classical augmentation on a grid of
    `spacing_mm` voxels (shifts defined in millimetres).

    Args:
        spacing_mm: voxel size of the training grid.
        spatial_dims: 2 or 3.
        classical: apply ClassicalAugmentation.
        flip: mirror each image left-right (the first spatial axis of a RAS volume) with probability 1/2;
            one uniform draw per image from the loop's generator, so resume stays bit-exact.
        share: probability that an image gets the classical augmentation (the others stay as acquired, as when
            augmented copies are added to the real images instead of replacing them); 1: every image.
    """

    spacing_mm: float = 3.0
    spatial_dims: int = 3
    classical: bool = True
    flip: bool = False
    share: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"augmentation share must be in (0, 1], got {self.share}")
        self.augmentation = ClassicalAugmentation(spatial_dims=self.spatial_dims, spacing_mm=self.spacing_mm)

    def __call__(self, batch: Any, generator: torch.Generator) -> Any:
        images = batch.images
        if self.flip:
            mirror = torch.rand(len(images), generator=generator, device=generator.device) < 0.5
            mirror = mirror.to(images.device).view(-1, *([1] * (images.ndim - 1)))
            images = torch.where(mirror, images.flip(2), images)  # dim 2: first spatial axis (R-L)
        if self.classical and self.share >= 1.0:
            images = self.augmentation(images, generator)
        elif self.classical:
            chosen = (torch.rand(len(images), generator=generator, device=generator.device) < self.share).tolist()
            with torch.no_grad():
                images = torch.stack([self.augmentation.apply(img, self.augmentation.draw(generator)) if c else img
                                      for img, c in zip(images, chosen, strict=True)])
        return dataclasses.replace(batch, images=images)


# Noise level 1.0 is a Gaussian SD of the whole model intensity range [-1, 1] (2 units): 10 % noise is SD 0.2,
# a tenth of the range from background to the 99.5th percentile of the brain.
NOISE_RANGE = 2.0


def add_noise(images: torch.Tensor, level: float | torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """images + level * NOISE_RANGE * eps: additive Gaussian noise at `level` (a share of the intensity range).

    Args:
        images: [B, C, *spatial] on the model scale [-1, 1].
        level: one level, or one per image [B].
        eps: standard normal noise shaped like images (drawn by the caller from a seeded generator).
    """
    level = torch.as_tensor(level, dtype=images.dtype, device=images.device)
    if level.ndim == 1:
        level = level.view(-1, *([1] * (images.ndim - 1)))  # [B] -> [B, 1, ..., 1]
    return images + level * NOISE_RANGE * eps.to(images.dtype)
