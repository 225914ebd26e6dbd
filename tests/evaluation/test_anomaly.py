"""Anomaly and denoising measurements, the held-out split, noise, and soft class conditions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medgen.data.augmentation import NOISE_RANGE, add_noise
from medgen.errors import MedgenError
from medgen.evaluation.anomaly import (
    auc_interval,
    code_distance,
    deficit_maps,
    error_maps,
    normative_z,
    region_score,
    roc,
    subject_scores,
    top_share,
)
from medgen.evaluation.denoising import psnr_ssim
from medgen.evaluation.splits import holdout_split, training_selection
from medgen.models.blocks import ClassConditionedLinear
from medgen.training.steps.vae import VAEStep


def test_top_share_finds_errors_inside_a_region():
    mask = np.ones((10, 10, 10), dtype=bool)
    region = np.zeros_like(mask)
    region[:2] = True  # 20 % of the brain
    maps = torch.rand(3, 10, 10, 10) * 0.1
    maps[:, :2] += 1.0  # the largest errors lie in the region
    share = top_share(maps, mask, {"r": region}, top=0.01)
    assert share["brain_share"]["r"] == pytest.approx(0.2)
    assert np.allclose(share["per_volume"]["r"], 1.0) and share["top_voxels"] == 10
    flat = top_share(torch.rand(50, 10, 10, 10), mask, {"r": region}, top=0.1)["per_volume"]["r"].mean()
    assert abs(flat - 0.2) < 0.03  # no preference: the region's share of the brain


def test_roi_deficit_sees_a_small_darkening_the_whole_brain_score_misses():
    """Six subjects: three "normal", three with their ROI 0.2 darker than the reconstruction; everyone also has a
    large error of random sign in a random place elsewhere (what a blurry reconstruction misses)."""
    g = torch.Generator().manual_seed(0)
    recon = torch.zeros(6, 1, 10, 10, 10)
    x = recon.clone()
    roi = np.zeros((10, 10, 10), dtype=bool)
    roi[:3, :3, :3] = True
    for i in range(6):
        k = int(torch.randint(3, 10, (1,), generator=g))
        x[i, 0, k, 5:, 5:] += 1.0 if i % 2 else -1.0  # the misses, larger than the effect
    x[3:, 0, :3, :3, :3] -= 0.2  # the darkening in the ROI
    d = deficit_maps(x, recon, sigma=0)
    assert torch.allclose(d, (recon - x)[:, 0])  # positive where the input is darker
    sick = [False] * 3 + [True] * 3
    assert roc(region_score(d, roi), sick)["auc"] == 1.0
    assert np.allclose(region_score(d, roi), [0, 0, 0, 0.2, 0.2, 0.2], atol=1e-6)
    whole = subject_scores(error_maps(x, recon, sigma=0), np.ones_like(roi))["top"]
    assert roc(whole, sick)["auc"] < 1.0
    with pytest.raises(MedgenError, match="empty"):
        region_score(d, np.zeros_like(roi))
    with pytest.raises(MedgenError, match="shape"):
        region_score(d, np.ones((4, 4, 4), dtype=bool))


def test_auc_interval_covers_the_auc_and_narrows_with_more_subjects():
    rng = np.random.default_rng(1)
    widths = []
    for n in (20, 200):
        s = np.concatenate([rng.normal(0, 1, n), rng.normal(1, 1, n)])
        y = np.r_[np.zeros(n, bool), np.ones(n, bool)]
        lo, hi = auc_interval(s, y, n_boot=500)
        assert lo <= roc(s, y)["auc"] <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2
    assert np.isnan(auc_interval([1.0, 2.0], [True, True])[0])
    lo, hi = auc_interval([0.0, 0.0, 1.0, 1.0], [False, False, True, True], n_boot=50)
    assert lo == hi == 1.0


def test_scores_and_roc():
    x = torch.zeros(4, 1, 8, 8, 8)
    recon = x.clone()
    recon[2:] += 0.5  # two volumes reconstructed badly
    err = error_maps(x, recon, sigma=0)
    s = subject_scores(err, np.ones((8, 8, 8), dtype=bool))
    assert np.allclose(s["mean"], [0, 0, 0.5, 0.5]) and np.allclose(s["top"], s["mean"])
    r = roc(s["mean"], [False, False, True, True])
    assert r["auc"] == 1.0 and r["n_positive"] == 2
    assert np.isnan(roc([1.0, 2.0], [True, True])["auc"])
    z = normative_z(err, torch.stack([torch.zeros(8, 8, 8), torch.ones(8, 8, 8)]))
    assert torch.allclose(z[2], torch.zeros(8, 8, 8)) and torch.allclose(z[0], torch.full((8, 8, 8), -0.5 / np.sqrt(0.5)))
    with pytest.raises(MedgenError):
        error_maps(x, recon[:, :, :4])
    ref = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
    d = code_distance(torch.tensor([[0.0, 0, 0], [4.0, 0, 0]]), ref)
    assert d[0] < 0.5 < 3.0 < d[1]


def test_psnr_ssim_and_noise_scale():
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(2, 1, 16, 16, 16, generator=g) * 2 - 1
    eps = torch.randn(clean.shape, generator=g)
    noisy = add_noise(clean, 0.1, eps)
    assert float((noisy - clean).std()) == pytest.approx(0.1 * NOISE_RANGE, rel=0.05)
    psnr, ssim = psnr_ssim(noisy, clean)
    assert torch.allclose(psnr, torch.full((2,), 20.0), atol=0.3)  # 20 log10(2 / 0.2)
    p_same, s_same = psnr_ssim(clean, clean)
    assert torch.all(s_same > 0.999) and torch.all(ssim < s_same)
    per = add_noise(clean, torch.tensor([0.0, 0.2]), eps)
    assert torch.equal(per[0], clean[0]) and not torch.equal(per[1], clean[1])


def test_holdout_split_is_stratified_disjoint_and_seeded():
    subjects = [f"s{i:02d}" for i in range(30) for _ in range(2)]  # two scans per subject
    labels = [i % 3 for i in range(30) for _ in range(2)]
    tr, out = holdout_split(subjects, labels, ["CN", "MCI", "AD"], holdout=0.2, seed=1)
    assert len(out) == 6 and not set(tr) & set(out) and len(tr) + len(out) == 30
    assert sorted(int(s[1:]) % 3 for s in out) == [0, 0, 1, 1, 2, 2]
    assert holdout_split(subjects, labels, ["CN", "MCI", "AD"], holdout=0.2, seed=1) == (tr, out)
    pos, rec = training_selection(subjects, labels, ["CN", "MCI", "AD"], classes=["CN"], holdout=0.2, seed=1)
    assert {labels[i] for i in pos} == {0} and not {subjects[i] for i in pos} & set(out)
    assert rec["train_per_class"] == {"CN": 8, "MCI": 0, "AD": 0} and len(pos) == 16  # both scans of each
    with pytest.raises(MedgenError, match="unknown class"):
        training_selection(subjects, labels, ["CN", "MCI", "AD"], classes=["XX"])
    with pytest.raises(MedgenError, match="at least 2 per class"):
        holdout_split(["a", "b", "c"], [0, 0, 1], ["CN", "AD"], holdout=0.5)


def test_soft_class_condition_matches_hard_labels():
    layer = ClassConditionedLinear(in_features=4, out_features=5, num_classes=3)
    x = torch.randn(3, 4)
    hard = layer(x, torch.tensor([0, 1, 2]))
    assert torch.allclose(layer(x, torch.eye(3)), hard, atol=1e-6)
    mid = layer(x[:1], torch.tensor([[0.5, 0.5, 0.0]]))
    assert torch.allclose(mid, 0.5 * (layer(x[:1], torch.tensor([0])) + layer(x[:1], torch.tensor([1]))), atol=1e-6)


def test_vae_step_input_noise_is_checked():
    assert VAEStep(input_noise=0.2).input_noise == 0.2
    with pytest.raises(MedgenError, match="input_noise"):
        VAEStep(input_noise=1.5)
