"""Preprocessing (MONAI): validate and bring volumes to the size^3 training space.

Preprocessing (per volume, cached in memory as one tensor):
    LoadImaged -> check 3D / finite / not constant -> EnsureChannelFirstd -> Orientationd(RAS)
    -> Spacingd(192 mm / size: 3 mm at 64^3) -> CropForegroundd (only when the volume does not fit the grid, so data already in the
    training space passes unchanged) -> ScaleIntensityRangePercentilesd(0.5, 99.5 -> [-1, 1], clip)
    -> ResizeWithPadOrCropd(size^3, pad -1 = background).
Tissue maps, when present, follow the same spatial steps with nearest-neighbour sampling.
"""

from __future__ import annotations

import functools
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from medgen.console import track
from medgen.data.dataset import ImageSet
from medgen.data.inspection import INTENSITY_RANGE, PERCENTILES, RAS_LABELS, root_message, volume_problem
from medgen.errors import MedgenError
from medgen.geometry import training_affine, training_spacing


def normalisation_record(size: int, spacing: float, ranges: Sequence[tuple[float, float]] = (),
                         header: dict[str, int] | None = None) -> dict[str, Any]:
    """How raw intensities and geometry were mapped (stored in ImageSet.normalisation and checkpoints).

    Args:
        size, spacing: the training grid.
        ranges: each volume's (low, high) intensity percentiles, mapped to [-1, 1]; their medians are
            recorded as "source_range", the intensity scale of the data (synth writes volumes back in it).
        header: the NIfTI header codes of the data (sform_code, qform_code, xyzt_units) that volumes
            written in the training space carry.
    """
    record: dict[str, Any] = {
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
    if ranges:
        lows, highs = np.asarray([r[0] for r in ranges]), np.asarray([r[1] for r in ranges])
        record["source_range"] = [float(np.median(lows)), float(np.median(highs))]
        record["source_range_statistic"] = "median over the volumes of each volume's percentiles"
    if header:
        record["nifti"] = dict(header)
    return record


def source_header(meta: dict[str, Any] | None) -> dict[str, int]:
    """sform_code, qform_code and xyzt_units of a loaded NIfTI (MONAI's meta dict); {} for other formats."""
    out = {}
    for key in ("sform_code", "qform_code", "xyzt_units"):
        value = (meta or {}).get(key)
        try:
            out[key] = int(np.asarray(value).reshape(-1)[0])
        except (TypeError, ValueError, IndexError):
            return {}
    return out


def common_header(headers: Sequence[dict[str, int]], own_affine: bool) -> dict[str, int]:
    """The header codes a set's training-space volumes carry: the most common ones of its files.

    When the set was re-centred (not the files' own affine) the grid is aligned, not scanner space: code 2.
    Codes 0 and 0 (no orientation recorded) become 1, so that readers use the affine that is written.
    """
    counts = Counter(tuple(sorted(h.items())) for h in headers if h)
    if not counts:
        return {}
    out = dict(counts.most_common(1)[0][0])
    if not own_affine:
        out["sform_code"] = out["qform_code"] = 2
    if out["sform_code"] == 0 and out["qform_code"] == 0:
        out["sform_code"] = out["qform_code"] = 1
    return out


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
        return {**data, "image": scaler(data["image"]), "source_range": (lo, hi)}

    def read(self, path: str, key: str = "image") -> torch.Tensor:
        """Load one file as a validated 3D MetaTensor (MedgenError naming the file otherwise)."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = self.load[key]({key: path})[key]
        except Exception as e:
            raise MedgenError(f"{path}: cannot read image ({root_message(e)})") from None
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
            dict with "image" [1, S, S, S] float32 in [-1, 1], "affine" (4x4 numpy), "source_range" (the
            intensities mapped to -1 and 1), "header" (the file's NIfTI codes, see source_header) and, when
            the record has a tissue map, "tissue" [1, S, S, S] in the smallest integer type that holds its
            labels (uint8 for the phantom's 0-3: 8x less memory than int64).
        """
        keys = ("image", "tissue") if record.get("tissue") else ("image",)
        data = {k: self.read(record[k], k) for k in keys}
        header = source_header(getattr(data["image"], "meta", None))
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
            raise MedgenError(f"{record['image']}: preprocessing failed ({root_message(e)})") from None
        image = data["image"]
        out = {
            "image": image.as_tensor().float() if hasattr(image, "as_tensor") else image.float(),
            "affine": np.asarray(image.affine, dtype=np.float64) if hasattr(image, "affine") else None,
            "source_range": data["source_range"],
            "header": header,
        }
        if "tissue" in data:
            t = data["tissue"]
            out["tissue"] = label_tensor(torch.round(t.as_tensor() if hasattr(t, "as_tensor") else t))
        return out


def label_tensor(labels: torch.Tensor) -> torch.Tensor:
    """Integer labels in the smallest type that holds them: uint8 (0-255), int16, else int64."""
    lo, hi = (int(labels.min()), int(labels.max())) if labels.numel() else (0, 0)
    if 0 <= lo and hi <= 255:
        return labels.to(torch.uint8)
    if -(2**15) <= lo and hi < 2**15:
        return labels.to(torch.int16)
    return labels.to(torch.int64)


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
    prep = Preprocessor(size=size, spacing=spacing)
    spacing = prep.spacing
    images, tissues, affines, ranges, headers = [], [], [], [], []
    threads = torch.get_num_threads()
    # Per-volume ops are small: one thread is faster than several (thread wake-up dominates, badly so on a
    # busy machine: 35x measured on 2 shared cores).
    torch.set_num_threads(1)
    try:
        for rec in track(records, description):
            out = prep(rec)
            images.append(out["image"])
            affines.append(out["affine"])
            ranges.append(out["source_range"])
            headers.append(out["header"])
            if "tissue" in out:
                tissues.append(out["tissue"])
    finally:
        torch.set_num_threads(threads)
    # One affine for the set: the images' own when they all agree (data already in training space, e.g. the
    # phantom), else the canonical centred RAS grid (each volume was centred on its foreground).
    first = affines[0]
    own = first is not None and all(a is not None and np.allclose(a, first, atol=1e-4) for a in affines)
    affine = first if own else training_affine(size, spacing)
    extras: dict[str, Any] = {}
    if tissues and len(tissues) == len(images):
        dtype = functools.reduce(torch.promote_types, {t.dtype for t in tissues})
        extras["tissue"] = torch.stack([t.to(dtype) for t in tissues])  # [N, 1, S, S, S], uint8 for the phantom
    return ImageSet(
        images=torch.stack(images).contiguous(),  # [N, 1, S, S, S] float32
        labels=torch.tensor([int(r["label"]) for r in records], dtype=torch.int64),
        subjects=[str(r["subject"]) for r in records],
        class_names=list(class_names),
        affine=affine,
        normalisation=normalisation_record(size, spacing, ranges, common_header(headers, own)),
        sources=[str(r["image"]) for r in records],
        extras=extras,
    )


# ----------------------------------------------------------------------------------------- augmentation


