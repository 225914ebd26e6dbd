"""File inspection: read a volume's header and voxels once and say what is wrong with it, in one line.

Used by the data-check report (data/check.py) and by preprocessing, which refuses the same problems.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np

PERCENTILES = (0.5, 99.5)


INTENSITY_RANGE = (-1.0, 1.0)


RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


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
        info.problem = f"{path}: cannot read image ({root_message(e)})"
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


def root_message(e: BaseException) -> str:
    """The innermost cause's first line (MONAI wraps errors in 'applying transform ...')."""
    while e.__cause__ is not None:
        e = e.__cause__
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__
