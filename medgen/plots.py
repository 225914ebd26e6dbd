"""Sample montages: three orthogonal mid-slices per volume (3D) or a grid of images (2D), as PNG."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
import torch

from medgen.outputs import atomic_write_bytes


def orthogonal_slices(volume: np.ndarray) -> list[np.ndarray]:
    """The three mid-slices of a [D, H, W] volume (across axis 0, 1, 2), rotated for display."""
    d, h, w = volume.shape
    return [np.rot90(volume[d // 2]), np.rot90(volume[:, h // 2]), np.rot90(volume[:, :, w // 2])]


def save_montage(
    images: torch.Tensor,
    labels: Sequence[int],
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str = "",
) -> None:
    """Write a PNG montage, one row per image: three orthogonal mid-slices for 3D, the image for 2D.

    Args:
        images: [N, C, *spatial] in [-1, 1] (first channel shown).
        labels: class index per image (row titles).
        class_names: name per class index.
        path: output PNG (written atomically).
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arr = images.detach().float().cpu().numpy()[:, 0]  # [N, *spatial]
    n = arr.shape[0]
    three_d = arr.ndim == 4
    if three_d:
        fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
        for i in range(n):
            for j, sl in enumerate(orthogonal_slices(arr[i])):
                axes[i, j].imshow(sl, cmap="gray", vmin=-1, vmax=1)
                axes[i, j].axis("off")
            axes[i, 0].set_title(class_names[int(labels[i])], fontsize=8, loc="left")
    else:
        cols = min(n, 8)
        rows = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for i in range(n):
            ax = axes[i // cols, i % cols]
            ax.imshow(arr[i], cmap="gray", vmin=-1, vmax=1)
            ax.set_title(class_names[int(labels[i])], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
