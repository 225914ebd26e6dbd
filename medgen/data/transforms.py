"""MONAI pipelines: validate and bring volumes to the size^3 training space; classical augmentation.

Preprocessing (per volume, cached in memory as one tensor):
    LoadImaged -> check 3D / finite / not constant -> EnsureChannelFirstd -> Orientationd(RAS)
    -> Spacingd(192 mm / size: 3 mm at 64^3) -> CropForegroundd (only when the volume does not fit the grid, so data already in the
    training space passes unchanged) -> ScaleIntensityRangePercentilesd(0.5, 99.5 -> [-1, 1], clip)
    -> ResizeWithPadOrCropd(size^3, pad -1 = background).
Tissue maps, when present, follow the same spatial steps with nearest-neighbour sampling.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medgen.data.dataset import ImageSet
from medgen.errors import MedgenError

FIELD_OF_VIEW_MM = 192.0  # the training grid always spans 192 mm: 3 mm voxels at 64^3 (as the phantom)
PERCENTILES = (0.5, 99.5)
INTENSITY_RANGE = (-1.0, 1.0)
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def training_spacing(size: int) -> float:
    """Voxel size (mm) of the size^3 training grid: 192 mm field of view, 3 mm at size 64."""
    return FIELD_OF_VIEW_MM / int(size)


def training_affine(size: int = 64, spacing: float | None = None, spatial_dims: int = 3) -> np.ndarray:
    """The canonical training-space affine: RAS, isotropic `spacing` mm, grid centre at world (0, 0, 0).

    Args:
        size: voxels per side.
        spacing: voxel size in mm (default training_spacing(size)).
        spatial_dims: 3 (a 4x4 affine) or 2 (3x3).
    """
    spacing = training_spacing(size) if spacing is None else float(spacing)
    affine = np.eye(spatial_dims + 1)
    affine[:spatial_dims, :spatial_dims] *= spacing
    affine[:spatial_dims, spatial_dims] = -spacing * (size - 1) / 2.0
    return affine


def normalisation_record(size: int, spacing: float) -> dict[str, Any]:
    """How raw intensities and geometry were mapped (stored in ImageSet.normalisation and checkpoints)."""
    return {
        "method": "ScaleIntensityRangePercentiles",
        "percentiles": list(PERCENTILES),
        "range": list(INTENSITY_RANGE),
        "clip": True,
        "orientation": "RAS",
        "spacing_mm": [spacing] * 3,
        "size": [size] * 3,
        "crop": "foreground, only when larger than the grid",
        "pad_value": INTENSITY_RANGE[0],
    }


MIN_SIDE = 8  # voxels per side: below this a volume holds too little anatomy to resample to a training grid


def volume_problem(shape: Sequence[int], n_nonfinite: int = 0, affine: Any = "unchecked") -> str | None:
    """Why an array of `shape` cannot be used as a 3D volume (None when it can); data-check and loading share it.

    A 4D array with a singleton last axis counts as 3D (it is squeezed on loading).

    Args:
        shape: the array shape as stored in the file.
        n_nonfinite: number of NaN/Inf voxels.
        affine: the voxel-to-world matrix (4x4), checked to be finite and invertible when given.
    """
    if not isinstance(affine, str):
        a = None if affine is None else np.asarray(affine, dtype=np.float64)
        if a is None or a.shape != (4, 4) or not np.isfinite(a).all() or abs(np.linalg.det(a[:3, :3])) < 1e-9:
            return "has a zero, singular or missing affine (voxel-to-world matrix); fix the header's qform/sform"
    shape = tuple(int(s) for s in shape)
    if len(shape) == 4 and shape[-1] == 1:
        shape = shape[:3]
    if len(shape) < 3 or (len(shape) == 3 and min(shape) == 1):
        return f"is a 2D image (shape {shape}); a 3D volume is needed"
    if len(shape) > 3:
        return f"is a {len(shape)}D image (shape {shape}); a single 3D volume is needed"
    if min(shape) < MIN_SIDE:
        return (f"is too small (shape {shape}); every side needs at least {MIN_SIDE} voxels to be resampled "
                "to a training grid")
    if n_nonfinite:
        return f"has {n_nonfinite} NaN/Inf voxels"
    return None


@dataclass
class VolumeInfo:
    """Header and raw-intensity facts about one image file, before any preprocessing.

    Attributes:
        path: the file.
        shape: array shape as stored.
        spacing: voxel sizes (mm) of the first three axes.
        orientation: axis codes of the affine, e.g. "RAS" or "LPS".
        dtype: stored data type.
        minimum, maximum: finite intensity range.
        p_low, p_high: the PERCENTILES of the finite intensities.
        problem: why the file cannot be used (None when it can).
    """

    path: str
    shape: tuple[int, ...] = ()
    spacing: tuple[float, ...] = ()
    orientation: str = ""
    dtype: str = ""
    minimum: float = float("nan")
    maximum: float = float("nan")
    p_low: float = float("nan")
    p_high: float = float("nan")
    problem: str | None = None


def inspect_volume(path: str) -> VolumeInfo:
    """Read one file with nibabel and describe it; problems are reported in `.problem`, never raised.

    Args:
        path: image file (NIfTI or any format nibabel reads).
    """
    import nibabel as nib

    info = VolumeInfo(path=str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = nib.load(str(path))
            info.shape = tuple(int(s) for s in img.shape)
            info.spacing = tuple(round(float(z), 4) for z in img.header.get_zooms()[:3])
            bad_affine = volume_problem((MIN_SIDE,) * 3, 0, img.affine)
            if bad_affine:
                info.problem = f"{path}: {bad_affine}"
                return info
            info.orientation = "".join(nib.aff2axcodes(img.affine))
            info.dtype = str(img.get_data_dtype())
            arr = np.asanyarray(img.dataobj)
    except Exception as e:
        info.problem = f"{path}: cannot read image ({_root_message(e)})"
        return info
    finite = np.isfinite(arr) if np.issubdtype(arr.dtype, np.floating) else np.ones(arr.shape, bool)
    n_bad = int(arr.size - np.count_nonzero(finite))
    problem = volume_problem(info.shape, n_bad)
    values = arr[finite] if n_bad else arr.ravel()
    if values.size:
        info.minimum, info.maximum = float(values.min()), float(values.max())
        info.p_low, info.p_high = (float(v) for v in np.percentile(values, PERCENTILES))
        if problem is None and info.minimum == info.maximum:
            problem = f"every voxel has the same value ({info.minimum:g}); the image is empty"
    if problem:
        info.problem = f"{path}: {problem}"
    return info


def _root_message(e: BaseException) -> str:
    """The innermost cause's first line (MONAI wraps errors in 'applying transform ...')."""
    while e.__cause__ is not None:
        e = e.__cause__
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _robust_range(x: torch.Tensor) -> tuple[float, float]:
    """The PERCENTILES of x (numpy's partition-based percentile; torch.quantile sorts and is ~15x slower)."""
    arr = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
    lo, hi = np.percentile(arr, PERCENTILES)
    return float(lo), float(hi)


def _foreground(x: torch.Tensor) -> torch.Tensor:
    """Voxels above 5% of the robust intensity range (tolerates non-zero background noise)."""
    lo, hi = _robust_range(x)
    return x > lo + 0.05 * (hi - lo)


class Preprocessor:
    """Loads, validates and brings one record's volume (and tissue map) to the size^3 training space.

    Args:
        size: output voxels per side.
        spacing: output voxel size in mm (default training_spacing(size): 3 mm at 64).
    """

    def __init__(self, size: int = 64, spacing: float | None = None):
        from monai.transforms import (
            Compose,
            CropForegroundd,
            EnsureChannelFirstd,
            LoadImaged,
            Orientationd,
            ResizeWithPadOrCropd,
            Spacingd,
        )

        if int(size) < 4:
            raise MedgenError(f"size {size}: volumes need at least 4 voxels per side")
        self.size = int(size)
        self.spacing = training_spacing(self.size) if spacing is None else float(spacing)
        grid = (self.size,) * 3
        self.load = {k: LoadImaged(k, image_only=True) for k in ("image", "tissue")}
        self.spatial = {
            keys: Compose([
                EnsureChannelFirstd(keys, channel_dim="no_channel"),
                Orientationd(keys, axcodes="RAS", labels=RAS_LABELS),
                Spacingd(keys, pixdim=(self.spacing,) * 3, mode=("bilinear", "nearest")[: len(keys)]),
            ])
            for keys in (("image",), ("image", "tissue"))
        }
        self.crop = {keys: CropForegroundd(keys, source_key="image", select_fn=_foreground, allow_smaller=True)
                     for keys in (("image",), ("image", "tissue"))}
        self.fit_image = ResizeWithPadOrCropd("image", grid, value=INTENSITY_RANGE[0])
        self.fit_tissue = ResizeWithPadOrCropd("tissue", grid, value=0)

    def scale(self, data: dict[str, Any]) -> dict[str, Any]:
        """ScaleIntensityRangePercentiles(0.5, 99.5 -> [-1, 1], clip), with the percentiles taken by numpy."""
        from monai.transforms import ScaleIntensityRange

        lo, hi = _robust_range(data["image"])
        if hi <= lo:  # a nearly constant volume: fall back to the full range
            lo, hi = float(data["image"].min()), float(data["image"].max())
        scaler = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=INTENSITY_RANGE[0], b_max=INTENSITY_RANGE[1],
                                     clip=True)
        return {**data, "image": scaler(data["image"])}

    def read(self, path: str, key: str = "image") -> torch.Tensor:
        """Load one file as a validated 3D MetaTensor (MedgenError naming the file otherwise)."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = self.load[key]({key: path})[key]
        except Exception as e:
            raise MedgenError(f"{path}: cannot read image ({_root_message(e)})") from None
        arr = img.as_tensor().numpy() if hasattr(img, "as_tensor") else img.numpy()
        n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        affine = img.affine.numpy() if hasattr(img, "affine") and hasattr(img.affine, "numpy") else None
        problem = volume_problem(tuple(img.shape), n_bad, affine if hasattr(img, "affine") else "unchecked")
        if problem:
            raise MedgenError(f"{path}: {problem}")
        if img.ndim == 4:
            img = img[..., 0]  # [X, Y, Z, 1] -> [X, Y, Z]; the MetaTensor keeps its affine
        if key == "image" and float(arr.max()) == float(arr.min()):
            raise MedgenError(f"{path}: every voxel has the same value ({float(arr.min()):g}); the image is empty")
        return img

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        """Preprocess one record.

        Returns:
            dict with "image" [1, S, S, S] float32 in [-1, 1], "affine" (4x4 numpy) and, when the record
            has a tissue map, "tissue" [1, S, S, S] int64.
        """
        keys = ("image", "tissue") if record.get("tissue") else ("image",)
        data = {k: self.read(record[k], k) for k in keys}
        for k in keys[1:]:
            if tuple(data[k].shape) != tuple(data["image"].shape):
                raise MedgenError(f"{record[k]}: shape {tuple(data[k].shape)} differs from its image "
                                  f"{record['image']} {tuple(data['image'].shape)}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                data = self.spatial[keys](data)
                if any(s > self.size for s in data["image"].shape[1:]):
                    data = self.crop[keys](data)
                data = self.scale(data)
                data = self.fit_image(data)
                if "tissue" in data:
                    data = self.fit_tissue(data)
        except MedgenError:
            raise
        except Exception as e:
            raise MedgenError(f"{record['image']}: preprocessing failed ({_root_message(e)})") from None
        image = data["image"]
        out = {
            "image": image.as_tensor().float() if hasattr(image, "as_tensor") else image.float(),
            "affine": np.asarray(image.affine, dtype=np.float64) if hasattr(image, "affine") else None,
        }
        if "tissue" in data:
            t = data["tissue"]
            out["tissue"] = torch.round(t.as_tensor() if hasattr(t, "as_tensor") else t).to(torch.int64)
        return out


def preprocess_records(
    records: list[dict[str, Any]],
    class_names: Sequence[str],
    *,
    size: int = 64,
    spacing: float | None = None,
    description: str = "loading volumes",
) -> ImageSet:
    """Run every record through the Preprocessor and stack the results in memory.

    Args:
        records: dicts with image (path), label (int), subject and optionally tissue (path).
        class_names: names of the label indices.
        size: output voxels per side.
        spacing: output voxel size in mm (default training_spacing(size): 3 mm at 64).
        description: progress bar label.
    """
    from medgen.console import track

    prep = Preprocessor(size=size, spacing=spacing)
    spacing = prep.spacing
    images, tissues, affines = [], [], []
    threads = torch.get_num_threads()
    # Per-volume ops are small: one thread is faster than several (thread wake-up dominates, badly so on a
    # busy machine: 35x measured on 2 shared cores).
    torch.set_num_threads(1)
    try:
        for rec in track(records, description):
            out = prep(rec)
            images.append(out["image"])
            affines.append(out["affine"])
            if "tissue" in out:
                tissues.append(out["tissue"])
    finally:
        torch.set_num_threads(threads)
    # One affine for the set: the images' own when they all agree (data already in training space, e.g. the
    # phantom), else the canonical centred RAS grid (each volume was centred on its foreground).
    first = affines[0]
    if first is not None and all(a is not None and np.allclose(a, first, atol=1e-4) for a in affines):
        affine = first
    else:
        affine = training_affine(size, spacing)
    extras: dict[str, Any] = {}
    if tissues and len(tissues) == len(images):
        extras["tissue"] = torch.stack(tissues)  # [N, 1, S, S, S] int64
    return ImageSet(
        images=torch.stack(images).contiguous(),  # [N, 1, S, S, S] float32
        labels=torch.tensor([int(r["label"]) for r in records], dtype=torch.int64),
        subjects=[str(r["subject"]) for r in records],
        class_names=list(class_names),
        affine=affine,
        normalisation=normalisation_record(size, spacing),
        sources=[str(r["image"]) for r in records],
        extras=extras,
    )


# ----------------------------------------------------------------------------------------- augmentation


@dataclass
class AugmentDraw:
    """Parameters drawn for one image: integer voxel shifts per axis and an in-plane angle (radians)."""

    shift: tuple[int, ...]
    angle: float

    @property
    def identity(self) -> bool:
        return not any(self.shift) and self.angle == 0.0


@dataclass
class ClassicalAugmentation:
    """The reference study's augmentation: random translation and axial-plane rotation.

    With probability p_translate the image is shifted; then each axis independently (probability p_axis) by
    min_shift..max_shift voxels in a random direction. With probability p_rotate it is rotated by an angle
    uniform in +-max_degrees in the axial plane (axes 0-1, R-A, of a RAS volume; the image plane in 2D).
    Parameters are drawn from a torch.Generator, then applied by a deterministic MONAI Affine (one resampling,
    border padding so the background stays background; an integer shift alone is exact).

    Args:
        spatial_dims: 2 or 3.
        p_translate: probability of translating an image.
        p_axis: probability of shifting along each axis, given a translation.
        min_shift, max_shift: shift size range in voxels.
        p_rotate: probability of rotating an image.
        max_degrees: largest rotation angle.
    """

    spatial_dims: int = 3
    p_translate: float = 0.95
    p_axis: float = 0.66
    min_shift: int = 1
    max_shift: int = 4
    p_rotate: float = 0.90
    max_degrees: float = 6.0

    def draw(self, generator: torch.Generator) -> AugmentDraw:
        """Draw one image's parameters (always the same number of random numbers, so streams stay aligned)."""
        d = self.spatial_dims
        u = torch.rand(3 + 3 * d, generator=generator, device=generator.device).tolist()
        translate, rotate, angle_u = u[0], u[1], u[2]
        axis_u, size_u, sign_u = u[3:3 + d], u[3 + d:3 + 2 * d], u[3 + 2 * d:3 + 3 * d]
        shift = [0] * d
        if translate < self.p_translate:
            n_sizes = self.max_shift - self.min_shift + 1
            for a in range(d):
                if axis_u[a] < self.p_axis:
                    magnitude = self.min_shift + min(int(size_u[a] * n_sizes), n_sizes - 1)
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


def classical_augmentation(spatial_dims: int = 3, **kwargs: Any) -> ClassicalAugmentation:
    """The reference study's classical augmentation (see ClassicalAugmentation).

    Args:
        spatial_dims: 2 or 3.
        **kwargs: other ClassicalAugmentation fields.
    """
    return ClassicalAugmentation(spatial_dims=spatial_dims, **kwargs)


_DEFAULT_3D = ClassicalAugmentation(spatial_dims=3)
_DEFAULT_2D = ClassicalAugmentation(spatial_dims=2)


def augment_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Classical augmentation of a batch [B, 1, D, H, W] (or [B, C, H, W]); deterministic given the generator."""
    aug = _DEFAULT_2D if images.ndim == 4 else _DEFAULT_3D
    return aug(images, generator)


def augment_training_batch(batch: Any, generator: torch.Generator) -> Any:
    """fit()'s `transform` hook: a copy of a training Batch with augmented images, same labels."""
    return dataclasses.replace(batch, images=augment_batch(batch.images, generator))
