"""Data: read user data or the built-in cohorts into an in-memory ImageSet."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medgen.data.datalist import (
    Datalist,
    detect_kind,
    read_datalist,
    require_per_class,
    subjects_per_class,
)
from medgen.data.dataset import ImageSet

__all__ = [
    "Datalist",
    "ImageSet",
    "detect_kind",
    "load_dataset",
    "read_datalist",
    "require_per_class",
    "subjects_per_class",
]


def load_dataset(
    spec: str | Path,
    *,
    image_column: str = "image",
    label_column: str = "label",
    group_column: str | None = None,
    size: int = 64,
    class_names: Sequence[str] | None = None,
    spacing: float | None = None,
) -> ImageSet:
    """Read, validate and preprocess a dataset into memory.

    Args:
        spec: a `medgen phantom` folder (datalist.json), a MONAI datalist JSON, a CSV/TSV table, or a
            `medgen scenes` folder (scenes.json).
        image_column: table column / datalist key with image paths (relative to the file).
        label_column: table column / datalist key with labels (class names or integers).
        group_column: table column / datalist key with the subject id (repeated scans share it).
        size: voxels per side of the training grid (volumes only).
        class_names: class order to use instead of the file's.
        spacing: voxel size (mm) of the training grid; default 192 mm / size (3 mm at 64, the phantom's).

    Returns:
        ImageSet with images [N, 1, size, size, size] in [-1, 1] and the training-space affine (RAS; the
        images' own common affine when they share one, else centred at world 0) (scenes: whatever medgen.data.scenes returns).
    """
    if detect_kind(spec) == "scenes":
        from medgen.data.scenes import load_scene_dataset

        return load_scene_dataset(Path(spec))
    from medgen.data.transforms import preprocess_records

    data = read_datalist(spec, image_column=image_column, label_column=label_column,
                         group_column=group_column, class_names=class_names)
    return preprocess_records(data.records, data.class_names, size=size, spacing=spacing)
