"""Synthesis metrics: MS-SSIM settings and behaviour, MMD, Frechet distance, nearest-neighbour check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medgen.config import TrainConfig
from medgen.data.dataset import ImageSet
from medgen.evaluation.metrics import (
    evaluate_synthesis,
    feature_extractor,
    frechet_distance,
    mmd,
    ms_ssim_settings,
    nearest_neighbour_rmse,
    pairwise_ms_ssim,
)
from medgen.training.loop import fit


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


def real_set(n: int = 12) -> ImageSet:
    labels = torch.arange(n) % 3
    images = (blobs(n) + 0.3 * labels.view(-1, 1, 1, 1, 1)).clamp(-1, 1)
    return ImageSet(images=images, labels=labels, subjects=[f"s{i}" for i in range(n)],
                    class_names=["CN", "MCI", "AD"], affine=np.diag([3.0, 3.0, 3.0, 1.0]))


def test_feature_extractor_trains_the_classifier():
    extract = feature_extractor(real_set(), iterations=2, batch_size=4, base_width=2)
    f = extract(real_set().images)
    assert f.ndim == 2 and f.shape[0] == 12 and torch.isfinite(f).all()


def test_evaluate_synthesis_per_class(tmp_path):
    real = real_set()
    fit("vae", real, tmp_path / "run", model_kwargs={"base_width": 4, "latent_dim": 8},
        train=TrainConfig(iterations=2, batch_size=4, precision="fp32", sample_every=0), device="cpu")
    result = evaluate_synthesis(tmp_path / "run", real, n_per_class=3, n_pairs=3,
                                extractor=lambda x: x.reshape(x.shape[0], -1)[:, :8])
    assert set(result["classes"]) == {"CN", "MCI", "AD"} and result["model"] == "vae"
    m = result["classes"]["AD"]
    for key in ("ms_ssim_synthetic", "ms_ssim_real", "mmd", "frechet", "nn_rmse_synthetic_to_train",
                "nn_rmse_real_to_train", "nn_ratio"):
        assert np.isfinite(m[key]), key
    assert m["n_real"] == 4 and m["n_synthetic"] == 3


def test_frechet_distance_keeps_stdout_clean(capsys):
    import torch

    from medgen.evaluation.metrics import frechet_distance

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)  # fewer samples than features
    assert frechet_distance(a, b) >= 0
    assert capsys.readouterr().out == ""
