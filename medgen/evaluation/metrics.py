"""Measurements of synthesis quality against real data, per class (used by `medgen evaluate-synth`).

- diversity: MS-SSIM among random synthetic pairs vs among real pairs (mode collapse -> higher synthetic value);
- distribution distance: MMD on voxels (MONAI MMDMetric) and a Frechet distance (MONAI FIDMetric) on the
  pooled features of a small 3D classifier trained on the real data;
- memorisation: RMSE of each synthetic volume to its nearest training volume vs the same for each real volume
  to its nearest other training volume (a synthetic/real ratio well below 1 suggests copies);
- class fidelity (issue 12), all in one stated feature space (`FeatureSpace`: PCA of block-averaged voxels
  plus intensity-histogram and high-frequency texture statistics, fit on the real data):
  class agreement (a logistic regression trained on real volumes labels the synthetic ones), a real vs
  synthetic two-sample test (cross-validated ROC AUC of a logistic regression), precision / recall /
  density / coverage (Kynkaanniemi et al. 2019; Naeem et al. 2020);
- disease effects with no learned model: soft tissue fractions from fixed intensity levels inside the
  phantom anatomy's regions (ventricle CSF, hippocampal and medial temporal GM, in mL), and per class pair
  the synthetic effect as a fraction of the real one with a bootstrap interval.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from medgen.data.anatomy import load_atlas
from medgen.errors import MedgenError
from medgen.geometry import mni_voxel_affine
from medgen.models.blocks import checkerboard_coefficients

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001)  # the first three MONAI/Wang et al. scales, renormalised below


def ms_ssim_settings(size: int) -> tuple[int, tuple[float, ...]]:
    """Kernel size and scale weights valid for an image edge of `size` voxels.

    MONAI requires size // (len(weights) - 1) ** 2 > kernel_size - 1; three scales with kernel 7 fit 64^3
    and 32^3, kernel 3 fits 16^3. Smaller images use two scales.
    """
    weights = MS_SSIM_WEIGHTS if size >= 12 else MS_SSIM_WEIGHTS[1:]
    div = max(1, len(weights) - 1) ** 2
    kernel = min(7, size // div)
    kernel = kernel if kernel % 2 == 1 else kernel - 1
    if kernel < 3:
        raise MedgenError(f"images of edge {size} are too small for MS-SSIM (need at least 12)")
    total = sum(weights)
    return kernel, tuple(w / total for w in weights)


def pairwise_ms_ssim(images: torch.Tensor, *, n_pairs: int = 50, seed: int = 0) -> float:
    """Mean MS-SSIM over random distinct pairs of a set of images (diversity; lower is more diverse).

    Args:
        images: [N, C, *spatial] in [-1, 1], N >= 2.
        n_pairs: pairs drawn (all pairs when there are fewer).
        seed: seed of the pair draw.
    """
    from monai.metrics import MultiScaleSSIMMetric

    n = images.shape[0]
    if n < 2:
        return float("nan")
    pairs = torch.combinations(torch.arange(n), 2)  # [P, 2]
    if pairs.shape[0] > n_pairs:
        pick = torch.randperm(pairs.shape[0], generator=torch.Generator().manual_seed(seed))[:n_pairs]
        pairs = pairs[pick]
    kernel, weights = ms_ssim_settings(min(images.shape[2:]))
    metric = MultiScaleSSIMMetric(spatial_dims=images.ndim - 2, data_range=1.0, kernel_size=kernel,
                                  weights=weights, reduction="mean")
    x = (images.float() + 1) / 2  # to [0, 1] for the luminance term
    values = []
    for i in range(0, pairs.shape[0], 16):
        p = pairs[i : i + 16]
        values.append(metric(x[p[:, 0]], x[p[:, 1]]).reshape(-1))  # [b]
    return float(torch.cat(values).mean())


def mmd(real: torch.Tensor, synthetic: torch.Tensor, *, seed: int = 0) -> float:
    """MONAI MMDMetric (linear kernel) between equally many real and synthetic volumes, per voxel.

    The larger set is subsampled; voxel vectors are scaled by 1/sqrt(V) so the value does not grow with
    the image size.
    """
    from monai.metrics import MMDMetric

    m = min(real.shape[0], synthetic.shape[0])
    if m < 2:
        return float("nan")
    g = torch.Generator().manual_seed(seed)
    r = real[torch.randperm(real.shape[0], generator=g)[:m]].float()
    s = synthetic[torch.randperm(synthetic.shape[0], generator=g)[:m]].float()
    scale = r[0].numel() ** 0.5
    return float(MMDMetric(y_mapping=lambda t: t / scale)(r, s))


def frechet_distance(real_features: torch.Tensor, synthetic_features: torch.Tensor) -> float:
    """Frechet distance between two feature sets [N, F] (MONAI FIDMetric)."""
    from monai.metrics import FIDMetric

    if real_features.shape[0] < 2 or synthetic_features.shape[0] < 2:
        return float("nan")
    # Fewer samples than features gives singular covariances: expected here. MONAI reports that with a
    # print(), which must not reach stdout (stdout carries the command's JSON result).
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        return float(FIDMetric()(synthetic_features.double(), real_features.double()))


def nearest_neighbour_rmse(queries: torch.Tensor, reference: torch.Tensor, *, exclude_self: bool = False) -> torch.Tensor:
    """Per-query RMSE to the closest reference image.

    Args:
        queries: [Q, C, *spatial].
        reference: [R, C, *spatial].
        exclude_self: queries are the reference set itself; ignore the zero self-distance.
    Returns:
        [Q] RMSE per voxel to the nearest reference.
    """
    q = queries.reshape(queries.shape[0], -1).float()  # [Q, V]
    r = reference.reshape(reference.shape[0], -1).float()  # [R, V]
    d = torch.cdist(q, r) / q.shape[1] ** 0.5  # [Q, R]
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    return d.min(dim=1).values


def leave_one_out_nn_rmse(reference: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """RMSE of each reference[idx] to its nearest other reference image."""
    q = reference[idx].reshape(idx.numel(), -1).float()  # [Q, V]
    r = reference.reshape(reference.shape[0], -1).float()  # [R, V]
    d = torch.cdist(q, r) / q.shape[1] ** 0.5  # [Q, R]
    d[torch.arange(idx.numel()), idx] = float("inf")
    return d.min(dim=1).values


# ------------------------------------------------------------------------------- class fidelity (issue 12)

HISTOGRAM_BINS = 16
PCA_COMPONENTS = 32
PRDC_K = 5


def split_halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of range(n) into two halves (the real-vs-real reference)."""
    perm = np.random.default_rng(seed).permutation(n)
    return perm[: n // 2], perm[n // 2 :]


def texture_features(images: torch.Tensor) -> np.ndarray:
    """Per-volume intensity histogram (HISTOGRAM_BINS fractions over [-1, 1]) and two high-frequency energies.

    The energies are the mean |x - 3-voxel box blur| and the mean |2x2x2 alternating-sign (checkerboard) Haar
    coefficient|; transposed-convolution checkerboards and blur move them away from the real values.

    Args:
        images: [N, C, *spatial] in [-1, 1] (first channel used).
    Returns:
        [N, HISTOGRAM_BINS + 2] float64.
    """
    x = images[:, :1].float()
    n, dims = x.shape[0], x.ndim - 2
    flat = x.reshape(n, -1).clamp(-1, 1)
    idx = ((flat + 1) / 2 * HISTOGRAM_BINS).long().clamp_(0, HISTOGRAM_BINS - 1)
    hist = torch.zeros(n, HISTOGRAM_BINS).scatter_add_(1, idx, torch.ones_like(flat)) / flat.shape[1]
    pool = F.avg_pool3d if dims == 3 else F.avg_pool2d
    blur = pool(x, 3, stride=1, padding=1, count_include_pad=False)
    hf = (x - blur).abs().reshape(n, -1).mean(1)
    checker = checkerboard_coefficients(x, 2**dims).abs().reshape(n, -1).mean(1)
    return torch.cat([hist, hf[:, None], checker[:, None]], dim=1).double().numpy()


def block_voxels(images: torch.Tensor) -> np.ndarray:
    """Voxels averaged in blocks to (about) 16 per side: [N, 16^D] float64 (the anatomy, not the texture)."""
    x = images[:, :1].float()
    k = max(1, min(x.shape[2:]) // 16)
    pool = F.avg_pool3d if x.ndim == 5 else F.avg_pool2d
    return (pool(x, k) if k > 1 else x).reshape(x.shape[0], -1).double().numpy()


class FeatureSpace:
    """The feature space of the class-fidelity metrics, fit on the real volumes only.

    Features: the first PCA_COMPONENTS principal components (whitened) of the voxels averaged in blocks to
    16 per side (12 mm at 64^3), concatenated with the texture features standardised by the real mean/SD.
    Every feature has unit variance on the real data, so Euclidean distances (PRDC) weigh them alike.

    Args:
        real: [N, C, *spatial] real volumes in [-1, 1], N >= 3.
        seed: PCA seed.
    """

    def __init__(self, real: torch.Tensor, *, seed: int = 0) -> None:
        if real.shape[0] < 3:
            raise MedgenError("the class-fidelity metrics need at least 3 real volumes")
        vox = block_voxels(real)
        n_comp = int(min(PCA_COMPONENTS, real.shape[0] - 1, vox.shape[1]))
        self.pca = PCA(n_components=n_comp, whiten=True, random_state=seed).fit(vox)
        tex = texture_features(real)
        self.tex_mean = tex.mean(0)
        self.tex_sd = np.where(tex.std(0) > 1e-8, tex.std(0), 1.0)
        self.dim = n_comp + tex.shape[1]
        # which columns measure what (the two-sample AUC per group says what gives a synthetic set away)
        self.groups = {"anatomy": slice(0, n_comp), "histogram": slice(n_comp, n_comp + HISTOGRAM_BINS),
                       "texture": slice(n_comp + HISTOGRAM_BINS, self.dim)}
        self.description = (f"{n_comp} whitened PCA components (fit on the real volumes) of voxels averaged in "
                            f"blocks to 16 per side, plus a {HISTOGRAM_BINS}-bin intensity histogram and two "
                            f"high-frequency energies standardised on the real volumes ({self.dim} features)")

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """[N, C, *spatial] -> [N, dim] float64."""
        pcs = self.pca.transform(block_voxels(images))
        tex = (texture_features(images) - self.tex_mean) / self.tex_sd
        return np.nan_to_num(np.concatenate([pcs, tex], axis=1), nan=0.0, posinf=0.0, neginf=0.0)


def _logistic(seed: int) -> LogisticRegression:
    return LogisticRegression(C=0.1, max_iter=5000, random_state=seed)


def class_recall(true: np.ndarray, pred: np.ndarray, num_classes: int) -> list[float]:
    """Recall of each class (nan for a class with no items)."""
    return [float(np.mean(pred[true == k] == k)) if np.any(true == k) else float("nan") for k in range(num_classes)]


def class_agreement(real_x: np.ndarray, real_y: np.ndarray, synth_x: np.ndarray, synth_y: np.ndarray,
                    num_classes: int, *, seed: int = 0, folds: int = 5) -> dict[str, Any]:
    """Class agreement: a logistic regression trained on the real features labels the synthetic ones.

    Args:
        real_x, real_y: real features [N, F] and labels [N] (the classifier's training data).
        synth_x, synth_y: synthetic features [M, F] and their intended labels [M].
        num_classes: number of classes.
        seed: classifier / fold seed.
        folds: folds of the real-vs-real reference.
    Returns:
        {"synthetic": recall per class, "reference": cross-validated recall per class on the real data (the
        same classifier judging held-out real volumes), "synthetic_mean", "reference_mean"}.
    """
    clf = _logistic(seed).fit(real_x, real_y)
    synthetic = class_recall(synth_y, clf.predict(synth_x), num_classes)
    counts = np.bincount(real_y, minlength=num_classes)
    k = int(min(folds, counts.min()))
    if k >= 2:
        cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        reference = class_recall(real_y, cross_val_predict(_logistic(seed), real_x, real_y, cv=cv), num_classes)
    else:
        reference = [float("nan")] * num_classes
    return {"synthetic": synthetic, "reference": reference, "synthetic_mean": float(np.nanmean(synthetic)),
            "reference_mean": float(np.nanmean(reference)) if k >= 2 else float("nan"), "reference_folds": k}


def two_sample_auc(a: np.ndarray, b: np.ndarray, *, seed: int = 0, folds: int = 5) -> float:
    """Cross-validated ROC AUC of a logistic regression telling set a [N, F] from set b [M, F] (0.5 = alike).

    Out-of-fold probabilities of every item (stratified folds), one AUC over all of them; nan when a set has
    fewer than 2 items.
    """
    k = int(min(folds, a.shape[0], b.shape[0]))
    if k < 2:
        return float("nan")
    x = np.concatenate([a, b])
    y = np.concatenate([np.zeros(a.shape[0], dtype=np.int64), np.ones(b.shape[0], dtype=np.int64)])
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    prob = cross_val_predict(_logistic(seed), x, y, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, prob))


def prdc(real: np.ndarray, fake: np.ndarray, *, k: int = PRDC_K) -> dict[str, float]:
    """Precision / recall (Kynkaanniemi et al. 2019) and density / coverage (Naeem et al. 2020) with k-NN balls.

    Written here because no installed package provides it; follows the reference `prdc` code (strict <).

    Args:
        real: [N, F] real features.
        fake: [M, F] synthetic features.
        k: neighbours defining each ball (reduced to the set sizes when they are small).
    """
    k = int(min(k, real.shape[0] - 1, fake.shape[0] - 1))
    if k < 1:
        return {"precision": float("nan"), "recall": float("nan"), "density": float("nan"),
                "coverage": float("nan"), "k": k}
    r, f = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)
    radius_r = torch.cdist(r, r).sort(dim=1).values[:, k]  # [N] (column 0 is the point itself)
    radius_f = torch.cdist(f, f).sort(dim=1).values[:, k]  # [M]
    d = torch.cdist(r, f)  # [N, M]
    inside_r = d < radius_r[:, None]  # fake j in real i's ball
    return {
        "precision": float(inside_r.any(dim=0).double().mean()),
        "recall": float((d < radius_f[None, :]).any(dim=1).double().mean()),
        "density": float(inside_r.double().sum() / (k * f.shape[0])),
        "coverage": float((d.min(dim=1).values < radius_r).double().mean()),
        "k": k,
    }


# ------------------------------------------------------------------ disease effects (no learned model)

MEASURES = {  # name -> (region of the phantom anatomy, tissue)
    "ventricle_csf_ml": ("ventricles", "csf"),
    "hippocampus_gm_ml": ("hippocampus", "gm"),
    "mtl_gm_ml": ("mtl", "gm"),
}
VENTRICLE_GROWTH_MM = 4.0  # the ventricle region grown by this much, so enlarged ventricles stay inside it


@dataclass
class Regions:
    """Soft region weights [*spatial] on a training grid (times the brain mask), the mask, the voxel volume (mL)."""

    weights: dict[str, np.ndarray]
    mask: np.ndarray
    voxel_ml: float


def anatomy_regions(size: int, affine: np.ndarray) -> Regions:
    """The phantom anatomy's regions (MNI space) on a size^3 training grid, each times the brain mask.

    The grid's voxels are mapped to MNI mm with geometry.mni_voxel_affine; where that differs from the atlas
    grid the maps are resampled (trilinear).
    """
    atlas = load_atlas(int(size))
    vox2mni = mni_voxel_affine(affine, int(size))
    maps = {"ventricles": atlas.regions["ventricles"], "hippocampus": atlas.regions["hippocampus"],
            "mtl": atlas.regions["mtl"], "mask": atlas.mask}
    if not np.allclose(vox2mni, atlas.affine, atol=1e-3):
        to_atlas = np.linalg.inv(atlas.affine) @ vox2mni
        coords = np.indices((size,) * 3, dtype=np.float64).reshape(3, -1)
        coords = to_atlas[:3, :3] @ coords + to_atlas[:3, 3:]
        maps = {k: ndi.map_coordinates(v, coords, order=1, mode="constant").reshape((size,) * 3)
                for k, v in maps.items()}
    spacing = float(np.abs(vox2mni[:3, :3]).max())
    grow = ndi.gaussian_filter(maps["ventricles"].astype(np.float64), VENTRICLE_GROWTH_MM / spacing / 2.0)
    maps["ventricles"] = np.clip(np.maximum(maps["ventricles"], 2.0 * grow), 0.0, 1.0)
    mask = np.clip(maps.pop("mask"), 0.0, 1.0)
    return Regions({k: (np.clip(v, 0.0, 1.0) * mask).astype(np.float32) for k, v in maps.items()},
                   mask=mask.astype(np.float32), voxel_ml=spacing**3 / 1000.0)


def tissue_levels(real: torch.Tensor, regions: Regions, *, max_voxels: int = 200_000, seed: int = 0) -> list[float]:
    """CSF, GM and WM intensity levels of the real volumes: 1D k-means (3 clusters) of brain voxels.

    Brain voxels: inside the template brain mask (> 0.5) and above the background (> -0.95 on the [-1, 1]
    scale). Fit on real volumes only; the same levels then measure real and synthetic volumes.
    """
    inside = torch.from_numpy(regions.mask > 0.5)
    x = real[:, 0][:, inside].reshape(-1).float().numpy()
    x = x[x > -0.95]
    if x.size < 3:  # no foreground inside the template mask: fall back to every voxel
        x = real[:, 0].reshape(-1).float().numpy()
    if x.size > max_voxels:
        x = np.random.default_rng(seed).choice(x, max_voxels, replace=False)
    centres = np.quantile(x, [0.15, 0.5, 0.85])
    for _ in range(50):
        assign = np.abs(x[:, None] - centres[None, :]).argmin(1)
        new = np.array([x[assign == j].mean() if np.any(assign == j) else centres[j] for j in range(3)])
        if np.allclose(new, centres):
            break
        centres = new
    return sorted(float(c) for c in centres)


def tissue_fractions(x: torch.Tensor, levels: Sequence[float]) -> dict[str, torch.Tensor]:
    """Piecewise-linear partial-volume fractions: CSF/GM mix between their levels, GM/WM mix between theirs."""
    c, g, w = levels
    csf = ((g - x) / max(g - c, 1e-6)).clamp(0, 1)
    wm = ((x - g) / max(w - g, 1e-6)).clamp(0, 1)
    return {"csf": csf, "gm": 1 - csf - wm, "wm": wm}


def regional_measures(images: torch.Tensor, regions: Regions, levels: Sequence[float]) -> dict[str, np.ndarray]:
    """MEASURES per volume (mL): region weight x tissue fraction, summed. images [N, 1, *S] -> {name: [N]}."""
    out: dict[str, list[float]] = {k: [] for k in MEASURES}
    w = {k: torch.from_numpy(v) for k, v in regions.weights.items()}
    for i in range(0, images.shape[0], 16):
        frac = tissue_fractions(images[i : i + 16, 0].float(), levels)
        for name, (region, tissue) in MEASURES.items():
            out[name] += ((frac[tissue] * w[region]).flatten(1).sum(1) * regions.voxel_ml).tolist()
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def effect_fraction(real_a: np.ndarray, real_b: np.ndarray, syn_a: np.ndarray, syn_b: np.ndarray, *,
                    n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """The synthetic effect (mean b - mean a) as a fraction of the real effect, with a 95% bootstrap interval.

    Each of the four groups is resampled with replacement, independently (percentile interval).
    Returns real_effect, synthetic_effect (both also relative to the class-a mean, as real_relative and
    synthetic_relative), fraction, fraction_low, fraction_high, real_effect_low/high.
    """
    def mean_diff(a: np.ndarray, b: np.ndarray) -> float:
        return float(b.mean() - a.mean())

    if min(len(real_a), len(real_b), len(syn_a), len(syn_b)) < 2:
        nan = float("nan")
        return {"real_effect": nan, "synthetic_effect": nan, "fraction": nan, "fraction_low": nan,
                "fraction_high": nan, "real_effect_low": nan, "real_effect_high": nan,
                "real_relative": nan, "synthetic_relative": nan}
    rng = np.random.default_rng(seed)

    def boot(v: np.ndarray) -> np.ndarray:
        return v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(1)

    real_d = boot(real_b) - boot(real_a)
    syn_d = boot(syn_b) - boot(syn_a)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = syn_d / real_d
    real_e, syn_e = mean_diff(real_a, real_b), mean_diff(syn_a, syn_b)
    lo, hi = np.nanpercentile(ratio, [2.5, 97.5]) if np.isfinite(ratio).any() else (float("nan"),) * 2
    rlo, rhi = np.percentile(real_d, [2.5, 97.5])
    return {
        "real_effect": real_e,
        "synthetic_effect": syn_e,
        "real_relative": real_e / float(real_a.mean()) if real_a.mean() else float("nan"),
        "synthetic_relative": syn_e / float(syn_a.mean()) if syn_a.mean() else float("nan"),
        "fraction": syn_e / real_e if real_e else float("nan"),
        "fraction_low": float(lo),
        "fraction_high": float(hi),
        "real_effect_low": float(rlo),
        "real_effect_high": float(rhi),
    }
