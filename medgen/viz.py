"""Every picture medgen draws: sample montages, cv-evaluate charts, segmentation panels and traversals.

Montages show three orthogonal mid-slices per volume (3D) or a grid of images (2D). matplotlib is
imported inside the drawing functions (it is slow to import and only needed when a picture is drawn).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from medgen.outputs import atomic_write_bytes


def orthogonal_slices(volume: np.ndarray) -> list[np.ndarray]:
    """The three mid-slices of a [D, H, W] volume (across axis 0, 1, 2), rotated for display."""
    d, h, w = volume.shape
    return [np.rot90(volume[d // 2]), np.rot90(volume[:, h // 2]), np.rot90(volume[:, :, w // 2])]


# (title, slice of a RAS [X, Y, Z] volume, marker at the image's left edge, at its right edge)
VIEWS = (("axial", "L", "R"), ("coronal", "L", "R"), ("sagittal", "P", "A"))


def ras_views(volume: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal and sagittal mid-slices of a RAS [X, Y, Z] volume, for display.

    Axial (z = mid): anterior up, the subject's left on the image's left (neurological convention); coronal
    (y = mid): superior up, left on the left; sagittal (x = mid): superior up, posterior on the left.
    """
    x, y, z = volume.shape
    return [np.rot90(volume[:, :, z // 2]), np.rot90(volume[:, y // 2, :]), np.rot90(volume[x // 2])]


def save_montage(
    images: torch.Tensor,
    labels: Sequence[int],
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str = "",
    reference: torch.Tensor | None = None,
    reference_labels: Sequence[int] | None = None,
) -> None:
    """Write a PNG montage, one row per image: axial / coronal / sagittal mid-slices for 3D, the image for 2D.

    3D rows are grouped by class, the real reference rows of a class (when given) first; each row is titled
    with its class and "real" or "synthetic", the columns with their view, and the slices carry orientation
    markers (L/R on axial and coronal, P/A on sagittal; the volumes are RAS, as medgen's training space is).

    Args:
        images: [N, C, *spatial] synthetic images in [-1, 1] (first channel shown).
        labels: class index per image.
        class_names: name per class index.
        path: output PNG (written atomically).
        title: figure title.
        reference: optional [R, C, *spatial] real images shown beside the synthetic rows.
        reference_labels: class index per reference image.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arr = images.detach().float().cpu().numpy()[:, 0]  # [N, *spatial]
    rows: list[tuple[np.ndarray, int, bool]] = [(a, int(k), False) for a, k in zip(arr, labels, strict=True)]
    if reference is not None:
        ref = reference.detach().float().cpu().numpy()[:, 0]
        ref_labels = list(reference_labels) if reference_labels is not None else [0] * len(ref)
        rows += [(a, int(k), True) for a, k in zip(ref, ref_labels, strict=True)]
    rows.sort(key=lambda r: (r[1], not r[2]))  # by class, the real rows of a class first (stable)
    n = len(rows)
    three_d = arr.ndim == 4
    if three_d:
        fig, axes = plt.subplots(n, 3, figsize=(6.4, 2.0 * n + 0.4), squeeze=False)
        for i, (vol, k, real) in enumerate(rows):
            for j, sl in enumerate(ras_views(vol)):
                ax = axes[i, j]
                ax.imshow(sl, cmap="gray", vmin=-1, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                for side in ax.spines.values():
                    side.set_visible(real)
                    side.set_color("tab:green")
                    side.set_linewidth(2)
                name, left, right = VIEWS[j]
                style = {"color": "yellow", "fontsize": 7, "fontweight": "bold", "va": "center",
                         "transform": ax.transAxes}
                ax.text(0.03, 0.5, left, ha="left", **style)
                ax.text(0.97, 0.5, right, ha="right", **style)
                if i == 0:
                    ax.set_title(name, fontsize=9)
            kind = "real" if real else "synthetic"
            axes[i, 0].set_ylabel(f"{class_names[k]}\n{kind}", fontsize=8,
                                  color="tab:green" if real else "black")
    else:
        cols = min(n, 8)
        nrows = (n + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(1.6 * cols, 1.6 * nrows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for i, (img, k, real) in enumerate(rows):
            ax = axes[i // cols, i % cols]
            ax.imshow(img, cmap="gray", vmin=-1, vmax=1)
            ax.set_title(f"{class_names[k]}{' real' if real else ''}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    height = fig.get_size_inches()[1]
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / height) if title else None)  # room for the title above the views
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_loss_curves(rows: Sequence[dict[str, Any]], title: str = "") -> bytes:
    """PNG of a run's log rows (log.csv): one panel per logged value against the iteration.

    Each panel shows the logged values and, with enough points, a moving average over a tenth of them.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in ("iteration", "seconds") and k not in keys]
    keys = keys[:12]
    cols = min(3, max(1, len(keys)))
    nrows = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 2.4 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys, strict=False):
        pts = [(r["iteration"], float(r[key])) for r in rows if key in r and r[key] not in ("", None)]
        if not pts:
            continue
        ax.axis("on")
        it = np.array([p[0] for p in pts], dtype=float)
        v = np.array([p[1] for p in pts], dtype=float)
        ax.plot(it, v, lw=0.8, alpha=0.5 if len(v) >= 10 else 1.0, marker="" if len(v) > 1 else "o")
        w = len(v) // 10
        if w >= 2:
            ax.plot(it[w - 1 :], np.convolve(v, np.ones(w) / w, mode="valid"), lw=1.5, color="tab:red")
        ax.set_title(key, fontsize=8)
        ax.set_xlabel("iteration", fontsize=7)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def save_loss_curves(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Write plot_loss_curves(rows) to `path` atomically (nothing for an empty log)."""
    if rows:
        atomic_write_bytes(path, plot_loss_curves(rows, title))


def plot_effects(effects: dict[str, dict[str, dict[str, Any]]]) -> bytes:
    """Disease effects recovered: per class pair and measure, the synthetic effect as a fraction of the real one
    (95% bootstrap interval), beside the real-vs-real reference (one half of the real data against the other).

    Args:
        effects: {"AD vs CN": {measure: {"fraction", "fraction_low", "fraction_high",
                 "reference": {same keys}}}}.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [(pair, m, v) for pair, per in effects.items() for m, v in per.items()]
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(items) + 1.2))
    for i, (_, _, v) in enumerate(items):
        for dy, src, colour, label in ((-0.15, v, "tab:blue", "synthetic / real"),
                                       (0.15, v.get("reference", {}), "tab:grey", "real half / other half")):
            f = src.get("fraction", float("nan"))
            lo, hi = src.get("fraction_low", float("nan")), src.get("fraction_high", float("nan"))
            if not np.isfinite(f):
                continue
            err = [[max(f - lo, 0.0)], [max(hi - f, 0.0)]] if np.isfinite(lo) and np.isfinite(hi) else None
            ax.errorbar([f], [i + dy], xerr=err, fmt="o", color=colour, capsize=3, ms=4,
                        label=label if i == 0 else None)
    ax.axvline(0.0, color="black", lw=0.8)
    ax.axvline(1.0, color="tab:green", lw=0.8, ls="--")
    ax.set_yticks(range(len(items)), [f"{p}: {m}" for p, m, _ in items], fontsize=7)
    ax.invert_yaxis()
    lim = max([3.0] + [abs(v.get("fraction", 0.0)) for _, _, v in items if np.isfinite(v.get("fraction", 0.0))])
    ax.set_xlim(-min(lim, 5.0), min(lim, 5.0))
    ax.set_xlabel("effect recovered (1 = the real effect, 0 = none)", fontsize=8)
    ax.set_title("Disease effects in the synthetic volumes (95% bootstrap intervals)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def plot_fidelity(rows: Sequence[tuple[str, dict[str, float], dict[str, float]]]) -> bytes:
    """Bars per metric: the synthetic value and the real-vs-real reference, per class and overall.

    Args:
        rows: (metric name, {group: synthetic value}, {group: reference value}); groups are the class
            names and "overall".
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, max(1, len(rows)))
    nrows = max(1, math.ceil(len(rows) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.6 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, syn, ref) in zip(axes.flat, rows, strict=False):
        ax.axis("on")
        groups = list(syn)
        x = np.arange(len(groups))
        ax.bar(x - 0.2, [syn[g] for g in groups], 0.4, label="synthetic")
        ax.bar(x + 0.2, [ref.get(g, float("nan")) for g in groups], 0.4, color="tab:grey", label="real reference")
        ax.set_xticks(x, groups, fontsize=7)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plot_accuracy(results: dict[str, Any]) -> bytes:
    """Bar chart: validation and test accuracy per arm, error bars = SD over folds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = results["arms"]
    x = np.arange(len(arms))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(arms) + 2), 4))
    for i, (role, name) in enumerate((("val", "validation"), ("test", "test"))):
        means = [a[f"{role}_accuracy"]["mean"] for a in arms]
        sds = [0 if a[f"{role}_accuracy"]["sd"] is None or math.isnan(a[f"{role}_accuracy"]["sd"])
               else a[f"{role}_accuracy"]["sd"] for a in arms]
        ax.bar(x + (i - 0.5) * 0.38, means, 0.38, yerr=sds, capsize=3, label=name)
    ax.axhline(1.0 / len(results["class_names"]), color="grey", lw=0.8, ls="--", label="chance")
    ax.set_xticks(x, [a["label"] for a in arms], rotation=60, ha="right")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"Accuracy per arm (mean ± SD over {results['folds']} folds)")
    ax.legend(fontsize=8)
    data = _png(fig)
    plt.close(fig)
    return data


def plot_confusions(results: dict[str, Any]) -> bytes:
    """Grid of summed (over folds) test confusion matrices, one per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = results["arms"]
    names = results["class_names"]
    cols = min(4, len(arms))
    rows = int(math.ceil(len(arms) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, a in zip(axes.flat, arms, strict=False):
        cm = np.array(a["test_confusion_sum"])
        ax.axis("on")
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                    color="white" if v > (cm.max() + cm.min()) / 2 else "black")
        ax.set_xticks(range(len(names)), names, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_title(a["label"], fontsize=9)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("true", fontsize=7)
    fig.suptitle("Test confusion matrices, summed over folds")
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


TRAVERSAL_STEPS = 7
TRAVERSAL_RANGE = 3.0


def palette(n: int) -> np.ndarray:
    """n distinct RGB colours in [0, 255] (matplotlib tab10/tab20)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return (np.array([cmap(i % cmap.N)[:3] for i in range(n)]) * 255).astype(np.uint8)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Image [C, H, W] in [-1, 1] -> [H, W, 3] uint8 (grey images repeated)."""
    a = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()
    a = np.moveaxis(a, 0, -1)
    return np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a


def mid_slice(x: torch.Tensor) -> torch.Tensor:
    """Middle axial slice of [..., X, Y, Z] -> [..., Y, X] rotated for display (superior up); 2D passes through."""
    return x[..., x.shape[-1] // 2].transpose(-1, -2).flip(-2)


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_panel(path: Path, model: torch.nn.Module, x: torch.Tensor, truth: torch.Tensor | None,
                truth_names: dict[int, str] | None = None, title: str = "") -> None:
    """One labelled PNG: input, reconstruction, argmax segmentation, truth (top row, with legends), then per
    decoder its image (middle row) and its weight map (bottom row, with its share of the pixels).

    Args:
        path: PNG to write.
        model: the parallel-decoder VAE (eval mode).
        x: one image [C, *S].
        truth: true id map [*S] or None.
        truth_names: names of true ids for the legend (e.g. {0: "sky", 1: "floor", 3: "object 1"});
            ids without a name are shown as "id N".
        title: figure title (e.g. the image's name).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    with torch.no_grad():
        out = model(x.unsqueeze(0))
    k = out.images.shape[1]
    view = (lambda t: mid_slice(t)) if x.ndim == 4 else (lambda t: t)
    seg = out.weights[0, :, 0].argmax(dim=0)
    pal = palette(max(k, 10))
    cols = max(k, 4)
    fig, axes = plt.subplots(3, cols, figsize=(1.9 * cols, 6.6), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    seg_view = view(seg).numpy()
    tiles = [("input", to_uint8(view(x)), None), ("reconstruction", to_uint8(view(out.recon[0])), None),
             ("segmentation (argmax w)", pal[seg_view],
              [Patch(color=pal[i] / 255, label=f"decoder {i}") for i in range(k) if (seg_view == i).any()])]
    if truth is not None:
        t = view(truth).numpy().astype(np.int64)
        tpal = palette(max(int(t.max()) + 1, 10))
        names = truth_names or {}
        tiles.append(("truth", tpal[t], [Patch(color=tpal[v] / 255, label=names.get(int(v), f"id {int(v)}"))
                                         for v in np.unique(t)]))
    for j, (name, img, handles) in enumerate(tiles):
        ax = axes[0, j]
        ax.imshow(img, interpolation="nearest")
        ax.set_title(name, fontsize=8)
        if handles:
            ax.legend(handles=handles, fontsize=5, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=2,
                      frameon=False, handlelength=1.0, columnspacing=0.6)
    area = out.weights[0, :, 0].flatten(1).mean(dim=1)  # [K] soft share of the pixels
    for i in range(k):
        axes[1, i].imshow(to_uint8(view(out.images[0, i])))
        axes[1, i].set_title(f"decoder {i} image", fontsize=8, color=pal[i] / 255)
        axes[2, i].imshow(view(out.weights[0, i, 0]).numpy(), cmap="gray", vmin=0, vmax=1)
        axes[2, i].set_title(f"decoder {i} weight ({100 * float(area[i]):.0f}%)", fontsize=8, color=pal[i] / 255)
    fig.text(0.005, 0.5, "weights: black 0, white 1", rotation=90, fontsize=6, va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_traversal(path: Path, model: torch.nn.Module, mu: torch.Tensor, index: int = 0) -> list[int]:
    """Latent traversal strip: row k varies decoder k's highest-variance latent dim of item `index`.

    Each row is titled with the decoder and the latent dimension, each column with the value given to it
    (the other latents keep the item's posterior means).

    Args:
        path: PNG to write.
        model: the parallel-decoder VAE.
        mu: [N, K, L] posterior means of the data (picks the dimension with most spread per decoder).
        index: item whose latents are varied.
    Returns:
        The latent dimension varied for each decoder.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = mu.shape[1]
    dims = mu.var(dim=0).argmax(dim=1).tolist() if mu.shape[0] > 1 else [0] * k  # [K]
    values = torch.linspace(-TRAVERSAL_RANGE, TRAVERSAL_RANGE, TRAVERSAL_STEPS)
    fig, axes = plt.subplots(k, TRAVERSAL_STEPS, figsize=(1.2 * TRAVERSAL_STEPS + 1.2, 1.25 * k + 0.5),
                             squeeze=False)
    with torch.no_grad():
        for d in range(k):
            z = mu[index].unsqueeze(0).repeat(TRAVERSAL_STEPS, 1, 1)  # [T, K, L]
            z[:, d, dims[d]] = values
            imgs = model.sample(z.flatten(1))  # [T, C, *S]
            if imgs.ndim == 5:
                imgs = mid_slice(imgs)
            for j, im in enumerate(imgs):
                ax = axes[d, j]
                ax.imshow(to_uint8(im))
                ax.set_xticks([])
                ax.set_yticks([])
                if d == 0:
                    ax.set_title(f"z = {float(values[j]):+.1f}", fontsize=7)
                if j == 0:
                    ax.set_ylabel(f"decoder {d}\ndim {dims[d]}", fontsize=7)
    fig.suptitle(f"latent traversal of item {index}: one decoder's most varying dimension per row", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return dims


def plot_curves(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str = "", x: str = "iteration",
                max_panels: int = 12) -> str:
    """Small multiples of logged values against `x` (one panel per column) as SVG text (for HTML pages).

    Args:
        rows: logged rows (dicts of floats, e.g. log.csv), sorted by `x`; missing values are skipped.
        columns: the columns to draw (at most `max_panels`).
        title: figure title.
        x: the x-axis column.
        max_panels: panel limit.
    Returns:
        An `<svg ...>` element (no XML prologue), text kept as text.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(columns)[:max_panels]
    n = max(1, len(columns))
    cols = min(n, 4)
    nrows = int(math.ceil(n / cols))
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "medgen"}):
        fig, axes = plt.subplots(nrows, cols, figsize=(3.0 * cols, 2.2 * nrows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, col in zip(axes.flat, columns, strict=False):
            pts = [(r[x], r[col]) for r in rows if r.get(col) is not None and r.get(x) is not None
                   and math.isfinite(float(r[col]))]
            ax.axis("on")
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, lw=1.2, marker="o" if len(pts) < 30 else None, ms=2.5)
            ax.set_title(col, fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            ax.set_xlabel(x, fontsize=7)
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
        plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _views(volume: np.ndarray, views: Sequence[int]) -> list[np.ndarray]:
    all_views = ras_views(volume)
    return [all_views[v] for v in views]


def save_strip(rows: Sequence[tuple[str, Sequence[np.ndarray], Sequence[str]]], path: str | os.PathLike,
               title: str = "", view: int = 0, highlight: Sequence[Sequence[bool]] | None = None) -> None:
    """A labelled strip of volumes: one row per (row label, volumes [X, Y, Z] in [-1, 1], column labels), each
    volume shown as one RAS mid-slice (`view`: 0 axial, 1 coronal, 2 sagittal); `highlight` frames real images.

    Args:
        rows: the rows; every volume has a column label above it.
        path: output PNG (written atomically).
        title: figure title.
        view: which mid-slice.
        highlight: per row and column, whether to frame the tile in green (e.g. the real endpoints).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = max(len(vols) for _, vols, _ in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.25 * ncols + 0.6, 1.45 * len(rows) + 0.5), squeeze=False)
    name, left, right = VIEWS[view]
    for i, (label, vols, col_labels) in enumerate(rows):
        for j in range(ncols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(vols):
                ax.axis("off")
                continue
            ax.imshow(_views(np.asarray(vols[j]), [view])[0], cmap="gray", vmin=-1, vmax=1)
            ax.set_title(col_labels[j], fontsize=6)
            framed = bool(highlight and highlight[i][j])
            for side in ax.spines.values():
                side.set_visible(framed)
                side.set_color("tab:green")
                side.set_linewidth(2)
            if j == 0:
                ax.set_ylabel(label, fontsize=7)
                style = {"color": "yellow", "fontsize": 6, "fontweight": "bold", "va": "center", "transform": ax.transAxes}
                ax.text(0.03, 0.5, left, ha="left", **style)
                ax.text(0.97, 0.5, right, ha="right", **style)
    fig.suptitle(f"{title} ({name} mid-slices)" if title else f"{name} mid-slices", fontsize=8)
    fig.tight_layout()
    atomic_write_bytes(path, _png(fig))
    plt.close(fig)


def save_anomaly_overlays(items: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]], path: str | os.PathLike,
                          vmax: float, title: str = "", label: str = "error") -> None:
    """Per subject one row: input, reconstruction and the error map over the input, axial and coronal mid-slices.

    Args:
        items: (row label, input [X, Y, Z] in [-1, 1], reconstruction, error map [X, Y, Z] >= 0).
        path: output PNG (written atomically).
        vmax: error at the top of the colour scale (the same for every row).
        title: figure title.
        label: what the map shows (colour bar label).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(items)
    height = 1.45 * n + 0.7
    fig, axes = plt.subplots(n, 6, figsize=(8.4, height), squeeze=False)
    fig.subplots_adjust(left=0.05, right=0.86, bottom=0.1 / height, top=1 - 0.55 / height, hspace=0.18, wspace=0.04)
    im = None
    for i, (row, x, recon, err) in enumerate(items):
        tiles = []
        for v in (0, 1):
            xs, rs, es = _views(x, [v])[0], _views(recon, [v])[0], _views(err, [v])[0]
            tiles += [(xs, None, f"input {VIEWS[v][0]}"), (rs, None, "reconstruction"), (xs, es, f"{label} overlay")]
        for j, (img, heat, name) in enumerate(tiles):
            ax = axes[i, j]
            ax.imshow(img, cmap="gray", vmin=-1, vmax=1)
            if heat is not None:
                im = ax.imshow(np.ma.masked_less_equal(heat, 0.05 * vmax), cmap="hot", vmin=0, vmax=vmax, alpha=0.75)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=7)
        axes[i, 0].set_ylabel(row, fontsize=7)
    if im is not None:
        fig.colorbar(im, cax=fig.add_axes((0.88, 0.3, 0.02, 0.4)), label=label)
    if title:
        fig.suptitle(title, fontsize=9, y=1 - 0.15 / height)
    atomic_write_bytes(path, _png(fig))
    plt.close(fig)


def plot_roc(curves: Sequence[tuple[str, np.ndarray, np.ndarray, float]], title: str = "") -> bytes:
    """ROC curves: (name, false positive rates, true positive rates, AUC) each, beside the chance diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    for name, fpr, tpr, auc in curves:
        ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title or "ROC", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    data = _png(fig)
    plt.close(fig)
    return data


def plot_groups(groups: dict[str, Sequence[float]], ylabel: str, title: str = "") -> bytes:
    """Box plot with the points of each group (e.g. anomaly scores per class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(groups)
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 3.6))
    ax.boxplot([list(groups[n]) for n in names], showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), [f"{n}\n(n={len(groups[n])})" for n in names], fontsize=8)
    rng = np.random.default_rng(0)
    for i, n in enumerate(names):
        ys = np.asarray(groups[n], dtype=float)
        ax.scatter(i + 1 + rng.uniform(-0.15, 0.15, len(ys)), ys, s=6, alpha=0.6)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    data = _png(fig)
    plt.close(fig)
    return data


def plot_denoise(levels: Sequence[float], series: dict[str, Sequence[float]], ylabel: str, title: str = "") -> bytes:
    """A metric (PSNR or SSIM) against the noise level, one line per method (noisy input, model, baselines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.4, 3.4))
    xs = [100 * v for v in levels]
    for name, ys in series.items():
        ax.plot(xs, ys, marker="o", ms=3, lw=1.4, label=name)
    ax.set_xlabel("noise level (% of the intensity range)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    data = _png(fig)
    plt.close(fig)
    return data
