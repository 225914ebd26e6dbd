"""Synthesis metrics: MS-SSIM settings and behaviour, MMD, Frechet distance, nearest-neighbour check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medgen.evaluation.metrics import (
    frechet_distance,
    mmd,
    ms_ssim_settings,
    nearest_neighbour_rmse,
    pairwise_ms_ssim,
)


def blobs(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth random volumes [n, 1, size^3] in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size // 4, size // 4, size // 4, generator=g)
    x = torch.nn.functional.interpolate(x, size=(size,) * 3, mode="trilinear", align_corners=False)
    return x * 2 - 1


@pytest.mark.parametrize("size,kernel,scales", [(64, 7, 3), (32, 7, 3), (16, 3, 3)])
def test_ms_ssim_settings_valid_for_sizes(size, kernel, scales):
    k, w = ms_ssim_settings(size)
    assert (k, len(w)) == (kernel, scales) and abs(sum(w) - 1) < 1e-6
    assert np.isfinite(pairwise_ms_ssim(blobs(3, size=min(size, 32)), n_pairs=3))


def test_ms_ssim_detects_mode_collapse():
    diverse = blobs(6)
    collapsed = diverse[:1].repeat(6, 1, 1, 1, 1) + 0.01 * torch.randn(6, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    assert pairwise_ms_ssim(collapsed, n_pairs=10) > 0.95 > pairwise_ms_ssim(diverse, n_pairs=10)


def test_mmd_and_frechet_zero_for_same_and_larger_for_shifted():
    a, b = blobs(8, seed=0), blobs(8, seed=1)
    assert mmd(a, b) < mmd(a, b + 0.5)
    fa = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(fa, fa) < 1e-6 < frechet_distance(fa, fa + 1.0)


def test_nearest_neighbour_flags_copies():
    train = blobs(6)
    copies = train[:3] + 0.001
    fresh = blobs(3, seed=9)
    assert nearest_neighbour_rmse(copies, train).max() < 0.01 < nearest_neighbour_rmse(fresh, train).min()
    assert nearest_neighbour_rmse(train, train, exclude_self=True).min() > 0


def test_frechet_distance_keeps_stdout_clean(capsys):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)  # fewer samples than features
    assert frechet_distance(a, b) >= 0
    assert capsys.readouterr().out == ""
