"""Data: read user data or the built-in cohorts into an in-memory ImageSet."""

from __future__ import annotations

from medgen.data.datalist import (
    Datalist,
    detect_kind,
    read_datalist,
    require_per_class,
    subjects_per_class,
)
from medgen.data.dataset import ImageSet
from medgen.data.sources import default_cache_dir, load_config_data, load_dataset

__all__ = [
    "Datalist",
    "ImageSet",
    "default_cache_dir",
    "detect_kind",
    "load_config_data",
    "load_dataset",
    "read_datalist",
    "require_per_class",
    "subjects_per_class",
]
