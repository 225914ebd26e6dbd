"""Class-fidelity metrics (issue 12): feature space, class agreement, two-sample AUC, PRDC, regional effects."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medgen.data.anatomy import load_atlas
from medgen.evaluation.metrics import (
    FeatureSpace,
    anatomy_regions,
    class_agreement,
    effect_fraction,
    prdc,
    regional_measures,
    texture_features,
    tissue_levels,
    two_sample_auc,
)
from medgen.geometry import mni_affine, mni_voxel_affine, training_affine
from tests.evaluation.test_metrics import blobs


def test_prdc_same_set_and_far_set():
    x = np.random.default_rng(0).normal(size=(60, 4))
    same = prdc(x, x.copy())
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0 and same["density"] >= 1.0
    far = prdc(x, x + 100.0)
    assert far["precision"] == far["recall"] == far["density"] == far["coverage"] == 0.0
    y = np.random.default_rng(1).normal(size=(60, 4))
    fresh = prdc(x, y)  # same distribution: high but not perfect
    assert 0.5 < fresh["precision"] <= 1.0 and 0.5 < fresh["coverage"] <= 1.0
    collapsed = prdc(x, np.zeros((60, 4)) + 0.01 * y)  # one point: precise, no recall
    assert collapsed["recall"] < 0.2 and collapsed["coverage"] < 0.3


def test_two_sample_auc_chance_for_same_distribution_high_for_shift():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(60, 5)), rng.normal(size=(60, 5))
    assert abs(two_sample_auc(a, b) - 0.5) < 0.2
    assert two_sample_auc(a, b + 1.5) > 0.9
    assert np.isnan(two_sample_auc(a[:1], b))


def test_class_agreement_recall_and_reference():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 30)
    means = np.eye(3, 6) * 3.0
    x = means[y] + rng.normal(size=(90, 6))
    good = means[y] + rng.normal(size=(90, 6))
    res = class_agreement(x, y, good, y, 3)
    assert res["synthetic_mean"] > 0.8 and res["reference_mean"] > 0.8 and len(res["synthetic"]) == 3
    no_class = np.zeros((90, 6)) + means[0] + rng.normal(size=(90, 6))  # every class looks like class 0
    res = class_agreement(x, y, no_class, y, 3)
    assert res["synthetic"][0] > 0.8 and res["synthetic"][1] < 0.2 and res["synthetic"][2] < 0.2


def test_feature_space_standardised_and_sees_checkerboards():
    real = blobs(24)
    space = FeatureSpace(real)
    f = space(real)
    assert f.shape == (24, space.dim) and np.isfinite(f).all()
    assert np.allclose(f.std(0)[f.std(0) > 0], 1.0, atol=0.05)
    checker = torch.ones(16, 16, 16)
    for d in range(3):
        checker = checker * (torch.arange(16) % 2 * 2 - 1).float().reshape([16 if i == d else 1 for i in range(3)])
    textured = (blobs(24, seed=5) + 0.15 * checker).clamp(-1, 1)
    assert texture_features(textured)[:, -1].mean() > 5 * texture_features(real)[:, -1].mean()
    assert two_sample_auc(f, space(textured)) > 0.9
    assert two_sample_auc(f[:12], f[12:]) < 0.8
    # the groups cover every column once; a checkerboard gives itself away in the texture group
    cols = sorted(i for cut in space.groups.values() for i in range(space.dim)[cut])
    assert cols == list(range(space.dim))
    tex = space.groups["texture"]
    assert two_sample_auc(f[:, tex], space(textured)[:, tex]) > 0.9


def atlas_volumes(n: int, ventricle_growth: float, seed: int, size: int = 16) -> torch.Tensor:
    """Volumes built from the template tissue maps at fixed levels; `ventricle_growth` turns that share of the
    ventricle region's non-CSF tissue into CSF (a disease effect), plus noise."""
    atlas = load_atlas(size)
    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        grow = np.clip(ventricle_growth + 0.05 * g.normal(), 0, 1) * atlas.regions["ventricles"]
        csf = atlas.csf + grow * (atlas.gm + atlas.wm)
        gm, wm = atlas.gm * (1 - grow), atlas.wm * (1 - grow)
        x = -1.0 * (1 - atlas.mask) + (-0.6 * csf + 0.1 * gm + 0.8 * wm)
        out.append(x + 0.02 * g.normal(size=x.shape))
    return torch.from_numpy(np.stack(out)[:, None].astype(np.float32)).clamp(-1, 1)


def test_mni_voxel_affine_maps_centred_grid_onto_phantom_grid():
    assert np.allclose(mni_voxel_affine(training_affine(16), 16), mni_affine(16))
    assert np.allclose(mni_voxel_affine(mni_affine(16), 16), mni_affine(16))
    a, b = anatomy_regions(16, mni_affine(16)), anatomy_regions(16, training_affine(16))
    for k in a.weights:
        assert np.allclose(a.weights[k], b.weights[k]) and a.weights[k].sum() > 0


def test_regional_effect_recovered_without_a_learned_model():
    regions = anatomy_regions(16, mni_affine(16))
    cn, ad = atlas_volumes(20, 0.0, 0), atlas_volumes(20, 0.5, 1)
    levels = tissue_levels(torch.cat([cn, ad]), regions)
    assert levels[0] < levels[1] < levels[2]
    m_cn, m_ad = (regional_measures(x, regions, levels)["ventricle_csf_ml"] for x in (cn, ad))
    assert m_ad.mean() > 1.2 * m_cn.mean()
    # a faithful generator (fresh draws of the same process) recovers about all of the effect
    s_cn, s_ad = (regional_measures(atlas_volumes(20, e, s), regions, levels)["ventricle_csf_ml"]
                  for e, s in ((0.0, 2), (0.5, 3)))
    good = effect_fraction(m_cn, m_ad, s_cn, s_ad, n_boot=500)
    assert 0.8 < good["fraction"] < 1.2 and good["fraction_low"] < 1.0 < good["fraction_high"]
    assert good["real_effect"] > 0 and good["real_relative"] > 0.2
    # a generator that draws every class as CN recovers none of it
    s_flat = regional_measures(atlas_volumes(20, 0.0, 4), regions, levels)["ventricle_csf_ml"]
    none = effect_fraction(m_cn, m_ad, s_cn, s_flat, n_boot=500)
    assert abs(none["fraction"]) < 0.2 and none["fraction_high"] < 0.5


def test_effect_fraction_small_groups_are_nan():
    assert np.isnan(effect_fraction(np.ones(1), np.ones(3), np.ones(3), np.ones(3))["fraction"])


@pytest.mark.parametrize("n", [3])
def test_feature_space_needs_three(n):
    FeatureSpace(blobs(n))
    with pytest.raises(Exception, match="at least 3"):
        FeatureSpace(blobs(2))
