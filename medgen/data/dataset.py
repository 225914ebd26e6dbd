"""ImageSet: the in-memory, preprocessed form every model and experiment reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

DEFAULT_CLASS_NAMES = ("CN", "MCI", "AD")  # the built-in cohort's classes, and the class order a table of these names gets


@dataclass
class ImageSet:
    """Preprocessed images with labels and subject ids, all in memory.

    Attributes:
        images: [N, C, *spatial] float32 in [-1, 1] (spatial 64^3 for volumes, 128^2 for scenes).
        labels: [N] int64 class indices into class_names.
        subjects: subject (group) id per item; repeated scans share an id.
        class_names: names of the classes, index = label.
        affine: 4x4 affine of the training space (None for 2D scenes).
        normalisation: how raw intensities were mapped to [-1, 1] (recorded in checkpoints).
        sources: original file per item (for error messages and reports).
        extras: optional per-item arrays keyed by name (e.g. "masks" for scenes, "tissue" maps).
    """

    images: torch.Tensor
    labels: torch.Tensor
    subjects: list[str]
    class_names: list[str]
    affine: np.ndarray | None = None
    normalisation: dict[str, Any] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def spatial_dims(self) -> int:
        return self.images.ndim - 2

    def subset(self, index: list[int] | np.ndarray | torch.Tensor) -> ImageSet:
        """A new ImageSet holding the items at `index` (same class names, affine, normalisation)."""
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64))
        take = [int(i) for i in idx]
        return ImageSet(
            images=self.images[idx],
            labels=self.labels[idx],
            subjects=[self.subjects[i] for i in take],
            class_names=list(self.class_names),
            affine=self.affine,
            normalisation=dict(self.normalisation),
            sources=[self.sources[i] for i in take] if self.sources else [],
            extras={k: (v[idx] if isinstance(v, (torch.Tensor, np.ndarray)) else [v[i] for i in take])
                    for k, v in self.extras.items()},
        )

    def class_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.labels, minlength=len(self.class_names)).tolist()
        return dict(zip(self.class_names, counts, strict=True))
