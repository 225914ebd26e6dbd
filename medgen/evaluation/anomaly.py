"""Anomaly detection by reconstruction error: error maps, per-subject scores, ROC AUC and where the top errors lie.

An autoencoder trained on one (normal) class reconstructs that class well; volumes of other classes give larger
errors where they differ. The measurements here take the inputs and reconstructions (no model):

- `error_maps`: |x - reconstruction|, Gaussian-smoothed (voxels), on the model scale [-1, 1];
- `deficit_maps`: reconstruction - x, signed and smoothed: positive where the input is darker than the normal
  reconstruction (on T1, tissue replaced by CSF: atrophy, enlarged ventricles);
- `normative_z`: each voxel's error as a z-score against the errors of reference (normal, training) volumes;
- `subject_scores`: per volume, the mean map value over the brain and the mean over its top 1 % voxels;
- `region_score`: per volume, the mean map value inside a region of interest (an a-priori ROI: a whole-brain
  top-1 % score is dominated by the many voxels every blurry reconstruction misses, a signed mean over the
  region where the disease acts is not);
- `roc`: ROC AUC (scikit-learn) of a score separating a positive class from the normal one;
- `auc_interval`: a stratified percentile-bootstrap 95 % interval of that AUC;
- `code_distance`: the Mahalanobis distance of a volume's latent code to the reference codes (the encoder's view);
- `top_share`: the share of a volume's top 1 % voxels that fall inside given regions, beside the share those
  regions have of the brain (what a map with no preference for them would give).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.networks.layers import GaussianFilter
from sklearn.metrics import roc_auc_score, roc_curve

from medgen.errors import MedgenError

TOP_SHARE = 0.01  # the top 1 % of brain voxels
Z_FLOOR = 1e-3  # smallest reference SD (model-scale units) a z-score divides by


def _smoothed_difference(images: torch.Tensor, recon: torch.Tensor, sigma: float, absolute: bool) -> torch.Tensor:
    """recon - images (or its absolute value) of the first channel [N, *spatial], Gaussian-smoothed (voxels)."""
    if images.shape != recon.shape:
        raise MedgenError(f"images {tuple(images.shape)} and reconstructions {tuple(recon.shape)} differ in shape")
    d = (recon.float() - images.float())[:, :1]  # [N, 1, *S]
    if absolute:
        d = d.abs()
    if sigma > 0:
        d = GaussianFilter(images.ndim - 2, sigma)(d)
    return d[:, 0]


def error_maps(images: torch.Tensor, recon: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Absolute reconstruction error [N, *spatial] (first channel), smoothed with a Gaussian of `sigma` voxels
    (MONAI GaussianFilter; 0: unsmoothed).

    Args:
        images: [N, C, *spatial] inputs.
        recon: [N, C, *spatial] reconstructions.
        sigma: smoothing in voxels.
    """
    return _smoothed_difference(images, recon, sigma, absolute=True)


def deficit_maps(images: torch.Tensor, recon: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Signed deficit [N, *spatial]: reconstruction - input (first channel), smoothed with a Gaussian of `sigma`
    voxels; positive where the input is darker than its normal reconstruction.

    Args:
        images: [N, C, *spatial] inputs.
        recon: [N, C, *spatial] reconstructions.
        sigma: smoothing in voxels.
    """
    return _smoothed_difference(images, recon, sigma, absolute=False)


def normative_z(maps: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Voxelwise z-scores of `maps` [N, *S] against the reference maps [R, *S] (mean and SD per voxel, SD floored)."""
    if reference.shape[0] < 2:
        raise MedgenError("z-scores need the error maps of at least 2 reference volumes")
    mean = reference.mean(dim=0)
    sd = reference.std(dim=0).clamp_min(Z_FLOOR)
    return (maps - mean) / sd


def subject_scores(maps: torch.Tensor, mask: np.ndarray, top: float = TOP_SHARE) -> dict[str, np.ndarray]:
    """Per volume: "mean" (mean map value over the brain mask) and "top" (mean over its top `top` share of voxels).

    Args:
        maps: [N, *S] error (or z) maps.
        mask: [*S] boolean brain mask.
        top: share of the brain voxels the "top" score averages.
    """
    m = torch.from_numpy(np.asarray(mask, dtype=bool))
    if int(m.sum()) == 0:
        raise MedgenError("the brain mask is empty")
    vals = maps[:, m]  # [N, V]
    k = max(1, int(round(top * vals.shape[1])))
    return {"mean": vals.mean(dim=1).numpy().astype(np.float64),
            "top": vals.topk(k, dim=1).values.mean(dim=1).numpy().astype(np.float64)}


def region_score(maps: torch.Tensor, region: np.ndarray) -> np.ndarray:
    """Per volume [N]: the mean of maps [N, *S] inside the boolean region [*S]."""
    r = torch.from_numpy(np.asarray(region, dtype=bool))
    if tuple(r.shape) != tuple(maps.shape[1:]):
        raise MedgenError(f"the region has shape {tuple(r.shape)}; the maps have {tuple(maps.shape[1:])}")
    if int(r.sum()) == 0:
        raise MedgenError("the region of interest is empty")
    return maps[:, r].mean(dim=1).numpy().astype(np.float64)


def roc(scores: Sequence[float], positive: Sequence[bool]) -> dict[str, Any]:
    """ROC AUC of `scores` (higher = more anomalous) for the positives against the rest, and the curve."""
    y = np.asarray(positive, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.all() or not y.any():
        return {"auc": float("nan"), "n_positive": int(y.sum()), "n_negative": int((~y).sum()), "fpr": [], "tpr": []}
    fpr, tpr, _ = roc_curve(y, s)
    return {"auc": float(roc_auc_score(y, s)), "n_positive": int(y.sum()), "n_negative": int((~y).sum()),
            "fpr": fpr.tolist(), "tpr": tpr.tolist()}


def auc_interval(scores: Sequence[float], positive: Sequence[bool], n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the ROC AUC, resampling positives and negatives separately (so every
    replicate has both), seeded; (nan, nan) when a group is empty."""
    y = np.asarray(positive, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    p = pos[rng.integers(0, len(pos), (n_boot, len(pos)))]  # [B, P]
    n = neg[rng.integers(0, len(neg), (n_boot, len(neg)))]  # [B, N]
    chunk = max(1, 20_000_000 // (len(pos) * len(neg)))  # replicates per step, to bound memory
    aucs = []
    for b in range(0, n_boot, chunk):
        diff = p[b:b + chunk, :, None] - n[b:b + chunk, None, :]  # [b, P, N]
        aucs.append((diff > 0).mean(axis=(1, 2)) + 0.5 * (diff == 0).mean(axis=(1, 2)))  # P(pos > neg) + ties / 2
    aucs = np.concatenate(aucs)
    a = (1 - level) / 2
    return float(np.quantile(aucs, a)), float(np.quantile(aucs, 1 - a))


def code_distance(codes: torch.Tensor, reference: torch.Tensor, ridge: float = 1e-2) -> np.ndarray:
    """Mahalanobis distance [N] of codes [N, L] to the reference codes [R, L] (covariance + ridge * I)."""
    if reference.shape[0] < 2:
        raise MedgenError("code distances need the codes of at least 2 reference volumes")
    ref = reference.double()
    mean = ref.mean(dim=0)
    cov = torch.cov((ref - mean).T).reshape(ref.shape[1], ref.shape[1]) + ridge * torch.eye(ref.shape[1], dtype=ref.dtype)
    d = codes.double() - mean  # [N, L]
    return torch.sqrt((d @ torch.linalg.inv(cov) * d).sum(dim=1).clamp_min(0)).numpy()


def top_share(maps: torch.Tensor, mask: np.ndarray, regions: dict[str, np.ndarray],
              top: float = TOP_SHARE) -> dict[str, Any]:
    """Where each volume's top `top` share of brain voxels (by map value) lie.

    Args:
        maps: [N, *S] maps.
        mask: [*S] boolean brain mask.
        regions: name -> [*S] boolean region (inside the brain mask).
        top: share of the brain voxels counted.
    Returns:
        {"per_volume": {region: [N] shares}, "brain_share": {region: share of the brain voxels},
         "top_voxels": k}.
    """
    m = torch.from_numpy(np.asarray(mask, dtype=bool))
    vals = maps[:, m]  # [N, V]
    k = max(1, int(round(top * vals.shape[1])))
    idx = vals.topk(k, dim=1).indices  # [N, k] positions among the brain voxels
    out: dict[str, Any] = {"per_volume": {}, "brain_share": {}, "top_voxels": k}
    for name, reg in regions.items():
        inside = torch.from_numpy(np.asarray(reg, dtype=bool))[m]  # [V]
        out["per_volume"][name] = inside[idx].float().mean(dim=1).numpy().astype(np.float64)
        out["brain_share"][name] = float(inside.float().mean())
    return out
