"""Write sampled volumes as NIfTI files in the generator's training space (nibabel only, no medgen).

Part of a MONAI bundle written by `medgen export`; configs/inference.json calls `write_volumes`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch


def to_intensity(images: torch.Tensor, intensity_range: Sequence[float] | None) -> torch.Tensor:
    """The sampler's [-1, 1] mapped linearly onto `intensity_range` (low, high); None keeps [-1, 1]."""
    if intensity_range is None:
        return images
    low, high = float(intensity_range[0]), float(intensity_range[1])
    return low + (images + 1.0) * (0.5 * (high - low))


def class_index(class_names: Sequence[str], class_name: str) -> int:
    """Index of `class_name`; an unknown name is one clear error listing the generator's classes."""
    if class_name not in class_names:
        raise ValueError(f"unknown class_name {class_name!r}; this generator has classes: {', '.join(class_names)}")
    return list(class_names).index(class_name)


def _save_atomic(image: nib.Nifti1Image, path: str) -> None:
    """nibabel.save to a temp file beside `path`, then rename (never a half-written or replaced file)."""
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; choose another output_dir (nothing was replaced)")
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".nii.gz", dir=os.path.dirname(path))
    os.close(fd)
    try:
        nib.save(image, tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_volumes(images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], affine: Sequence,
                  nifti: dict, output_dir: str, intensity_range: Sequence[float] | None = None,
                  prefix: str = "synthetic", seed: int = 0) -> list[str]:
    """Write images [N, 1, D, H, W] (the sampler's [-1, 1]) as OUTPUT_DIR/{prefix}_{class}_{seed}_{i}.nii.gz.

    Args:
        images: sampled volumes in [-1, 1].
        labels: class index per volume [N].
        class_names: name per class index.
        affine: the 4x4 training-space affine.
        nifti: sform_code, qform_code and xyzt_units of the training data.
        output_dir: created if missing; existing files are never replaced.
        intensity_range: values that -1 and 1 map to (the training data's scale), or None for [-1, 1].
        prefix: file name prefix.
        seed: the latents' seed (in the file names, so runs with other seeds do not collide).
    Returns:
        The paths written, also listed in OUTPUT_DIR/{prefix}_{class}_{seed}_datalist.json (a MONAI datalist).
    """
    aff = np.asarray(affine, dtype=np.float64)
    labels = [int(k) for k in labels.tolist()]
    names = [f"{prefix}_{class_names[k]}_{seed}_{i:04d}.nii.gz" for i, k in enumerate(labels)]
    listing = f"{prefix}_{'-'.join(sorted({class_names[k] for k in labels}))}_{seed}_datalist.json"
    taken = [n for n in [*names, listing] if os.path.exists(os.path.join(output_dir, n))]
    if taken:  # checked before anything is written: never a half-replaced output
        raise FileExistsError(f"{os.path.join(output_dir, taken[0])} exists; choose another output_dir or seed "
                              "(nothing was written)")
    os.makedirs(output_dir, exist_ok=True)
    volumes = to_intensity(images.detach().float().cpu(), intensity_range).numpy()  # [N, C, D, H, W]
    written = []
    for vol, name in zip(volumes, names, strict=True):
        img = nib.Nifti1Image(np.asarray(vol[0], dtype=np.float32), aff)  # [D, H, W] voxel axes of the affine
        img.set_qform(aff, code=int(nifti["qform_code"]))
        img.set_sform(aff, code=int(nifti["sform_code"]))
        img.header["xyzt_units"] = int(nifti["xyzt_units"])
        path = os.path.join(output_dir, name)
        _save_atomic(img, path)
        written.append(path)
    datalist = {"labels": {str(k): c for k, c in enumerate(class_names)}, "numTraining": len(names),
                "training": [{"image": n, "label": k} for n, k in zip(names, labels, strict=True)]}
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".json", dir=output_dir)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(datalist, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, os.path.join(output_dir, listing))
    return written
