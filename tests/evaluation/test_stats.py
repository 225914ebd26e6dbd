import math

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from medgen.evaluation.stats import (
    classification_metrics,
    corrected_resampled_ttest,
    mean_sd,
    paired_bootstrap,
)


def test_corrected_ttest_matches_hand_computation():
    a = [0.70, 0.72, 0.68, 0.75, 0.71, 0.69]
    b = [0.65, 0.66, 0.67, 0.70, 0.64, 0.66]
    # d = [.05 .06 .01 .05 .07 .03]; mean .045; var(ddof=1) = 2350e-6 / 5 = 470e-6
    # t = .045 / sqrt((1/6 + 50/250) * 470e-6) = 3.42790; two-sided p (df 5) = 0.018678
    r = corrected_resampled_ttest(a, b, n_train=250, n_test=50)
    assert r.df == 5
    assert r.mean_diff == pytest.approx(0.045)
    assert r.sd_diff == pytest.approx(math.sqrt(470e-6))
    assert r.t == pytest.approx(3.42790, abs=1e-4)
    assert r.p == pytest.approx(0.018678, abs=1e-5)


def test_correction_makes_test_more_conservative_than_plain_paired():
    from scipy import stats

    rng = np.random.default_rng(0)
    a = rng.normal(0.7, 0.03, 6)
    b = a - rng.normal(0.02, 0.02, 6)
    plain = stats.ttest_rel(a, b).pvalue
    corrected = corrected_resampled_ttest(a, b, n_train=250, n_test=50).p
    assert corrected > plain
    # swapping the arms flips the sign, keeps p
    r1 = corrected_resampled_ttest(a, b, 250, 50)
    r2 = corrected_resampled_ttest(b, a, 250, 50)
    assert r1.t == pytest.approx(-r2.t) and r1.p == pytest.approx(r2.p)


def test_identical_arms_give_p_one():
    r = corrected_resampled_ttest([0.5, 0.6, 0.7], [0.5, 0.6, 0.7], 100, 20)
    assert r.t == 0.0 and r.p == 1.0


def test_classification_metrics_with_a_missing_class():
    y = np.array([0, 0, 1, 1, 1, 0])
    prob = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1],
                     [0.3, 0.6, 0.1], [0.6, 0.3, 0.1], [0.7, 0.2, 0.1]])
    m = classification_metrics(y, prob, num_classes=3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["recall"][0] == pytest.approx(2 / 3) and m["recall"][1] == pytest.approx(2 / 3)
    assert math.isnan(m["recall"][2])
    assert m["confusion"] == [[2, 1, 0], [1, 2, 0], [0, 0, 0]]
    assert 0.0 <= m["macro_auc"] <= 1.0
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)


def test_mean_sd():
    m, s = mean_sd([1.0, 2.0, 3.0])
    assert m == 2.0 and s == pytest.approx(1.0)
    assert math.isnan(mean_sd([1.0])[1])


def test_corrected_ttest_interval_inverts_the_test():
    a = [0.70, 0.72, 0.68, 0.75, 0.71, 0.69]
    b = [0.65, 0.66, 0.67, 0.70, 0.64, 0.66]
    r = corrected_resampled_ttest(a, b, n_train=250, n_test=50)
    assert r.ci_low < r.mean_diff < r.ci_high
    assert r.p < 0.05 and r.ci_low > 0  # significant at 5 % <=> the 95 % interval excludes 0
    r99 = corrected_resampled_ttest(a, b, n_train=250, n_test=50, level=0.99)
    assert r99.ci_low < r.ci_low and r99.ci_high > r.ci_high
    # the half width at level 1 - p touches zero
    edge = corrected_resampled_ttest(a, b, n_train=250, n_test=50, level=1 - r.p)
    assert edge.ci_low == pytest.approx(0.0, abs=1e-9)


def test_holm_adjustment():
    from medgen.evaluation.stats import holm

    # sorted p: 0.01 (x3), 0.02 (x2), 0.04 (x1) -> 0.03, 0.04, 0.04 (monotone)
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    out = holm([0.01, math.nan, 0.2])
    assert math.isnan(out[1]) and out[0] == pytest.approx(0.02) and out[2] == pytest.approx(0.2)


def test_equivalent_subjects_interpolates_and_extrapolates():
    from medgen.evaluation.stats import equivalent_subjects

    n = [125, 188, 250]
    s = [0.50, 0.55, 0.60]
    assert equivalent_subjects(n, s, 0.55) == (pytest.approx(188), False)
    v, ext = equivalent_subjects(n, s, 0.575)
    assert v == pytest.approx(219) and not ext
    v, ext = equivalent_subjects(n, s, 0.62)  # beyond: end slope 0.05 / 62 subjects
    assert ext and v == pytest.approx(250 + 0.02 / (0.05 / 62))
    # a noisy dip is flattened by the running maximum
    v, ext = equivalent_subjects(n, [0.50, 0.49, 0.60], 0.55)
    assert not ext and 188 < v < 250


def test_paired_bootstrap_sees_a_better_predictor_and_nothing_between_equals():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], [120, 100, 80])
    good = np.where(rng.random(len(y)) < 0.7, y, rng.integers(0, 3, len(y)))
    worse = np.where(rng.random(len(y)) < 0.1, (good + 1) % 3, good)  # the same predictions, 10 % of them spoiled
    r = paired_bootstrap(y, good, worse, 3, resamples=2000)
    assert r.mean_diff == pytest.approx(balanced_accuracy_score(y, good) - balanced_accuracy_score(y, worse))
    assert r.ci_low > 0 and r.p < 0.01 and r.n == len(y)
    same = paired_bootstrap(y, good, good, 3, resamples=500)
    assert same.mean_diff == 0 and same.p == 1.0


def test_paired_bootstrap_is_calibrated_under_the_null():
    # Two unrelated chance-level predictors: about 5 % of p-values below 0.05, not many more.
    y = np.repeat([0, 1, 2], 60)
    ps = []
    for seed in range(200):
        r = np.random.default_rng(seed)
        ps.append(paired_bootstrap(y, r.integers(0, 3, len(y)), r.integers(0, 3, len(y)), 3, resamples=500,
                                   seed=seed).p)
    assert np.mean(np.asarray(ps) < 0.05) <= 0.10
    assert np.mean(np.asarray(ps) < 0.5) == pytest.approx(0.5, abs=0.12)
