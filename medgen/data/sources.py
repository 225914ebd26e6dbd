"""Where training data comes from: a dataset spec (folder, datalist, table, scenes) or the cached phantom.

`load_dataset` reads any spec into an in-memory ImageSet; `load_config_data` reads the data a config
names (cfg.data.path, or the built-in phantom cohort, generated once into the cache).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medgen.console import log
from medgen.data.datalist import detect_kind, read_datalist
from medgen.data.dataset import ImageSet
from medgen.data.phantom import ensure_cohort
from medgen.data.preprocessing import preprocess_records
from medgen.data.scenes import load_scene_dataset


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
        return load_scene_dataset(Path(spec))
    data = read_datalist(spec, image_column=image_column, label_column=label_column,
                         group_column=group_column, class_names=class_names)
    images = preprocess_records(data.records, data.class_names, size=size, spacing=spacing)
    images.normalisation["source_dataset"] = source_dataset(spec)
    return images


def source_dataset(spec: str | Path) -> dict[str, Any]:
    """Where a dataset came from, as recorded with its normalisation (synth names it in SourceDatasets):
    the file URI of the folder or file, and whether it is a `medgen phantom` cohort (brain-extracted)."""
    path = Path(spec).expanduser().resolve()
    folder = path if path.is_dir() else path.parent
    return {"uri": path.as_uri(), "phantom": (folder / "phantom.json").is_file()}


def default_cache_dir() -> Path:
    """Where the built-in phantom cohort is cached: $MEDGEN_CACHE_DIR or ~/.cache/medgen."""
    return Path(os.environ.get("MEDGEN_CACHE_DIR") or Path.home() / ".cache" / "medgen")


def load_config_data(cfg: Any, class_names: list[str] | None = None, size: int | None = None) -> ImageSet:
    """The training data a config names: cfg.data.path, or the cached built-in phantom cohort.

    Args:
        cfg: a medgen.config.Config.
        class_names: class order to enforce (e.g. a checkpoint's).
        size: grid size to use instead of cfg.data.size.
    """
    spec = cfg.data.path
    if spec is None:
        ph = cfg.phantom
        cache = Path(ph.cache_dir).expanduser() if ph.cache_dir else default_cache_dir()
        log(f"using the built-in phantom cohort (n={ph.n}, seed={ph.seed}, size={ph.size}) cached in {cache}")
        spec = ensure_cohort(cache, n=ph.n, seed=ph.seed, effect_scale=ph.effect_scale, size=ph.size)
    return load_dataset(spec, image_column=cfg.data.image_column, label_column=cfg.data.label_column,
                        group_column=cfg.data.group_column, size=size or cfg.data.size, class_names=class_names)
