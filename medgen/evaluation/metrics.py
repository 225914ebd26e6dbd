"""Measurements of synthesis quality against real data, per class (used by `medgen evaluate-synth`).

- diversity: MS-SSIM among random synthetic pairs vs among real pairs (mode collapse -> higher synthetic value);
- distribution distance: MMD on voxels (MONAI MMDMetric) and a Frechet distance (MONAI FIDMetric) on the
  pooled features of a small 3D classifier trained on the real data;
- memorisation: RMSE of each synthetic volume to its nearest training volume vs the same for each real volume
  to its nearest other training volume (a synthetic/real ratio well below 1 suggests copies).
"""

from __future__ import annotations

import contextlib
import sys
import warnings

import torch

from medgen.errors import MedgenError

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
