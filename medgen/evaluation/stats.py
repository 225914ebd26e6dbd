"""Classification metrics, the corrected resampled t-test and the paired test-set bootstrap used by the cv-evaluate
report."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as sps
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    recall_score,
    roc_auc_score,
)


@dataclass
class TTestResult:
    """Paired comparison over K resamples: mean and SD of the differences, t statistic, df, p-value."""

    mean_diff: float
    sd_diff: float
    t: float
    df: int
    p: float
    ci_low: float = math.nan
    ci_high: float = math.nan

    def to_dict(self) -> dict:
        return asdict(self)


def corrected_resampled_ttest(a: list[float] | np.ndarray, b: list[float] | np.ndarray,
                              n_train: float, n_test: float, level: float = 0.95) -> TTestResult:
    """Nadeau & Bengio (2003) corrected resampled t-test of paired scores a - b.

    t = mean(d) / sqrt((1/k + n_test/n_train) * var(d, ddof=1)), df = k - 1, two-sided p; the interval
    is mean(d) +- t_{(1+level)/2, k-1} * sqrt((1/k + n_test/n_train) * var(d)), the same test inverted.
    The n_test/n_train term accounts for the overlap of training sets across folds, which makes the
    plain paired t-test far too optimistic. (scipy has no corrected variant; written here.)

    Args:
        a, b: per-fold scores of two arms (same folds, same order).
        n_train: training-set size per fold (mean over folds).
        n_test: evaluation-set size per fold (mean over folds).
        level: confidence level of the interval (ci_low, ci_high).
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    k = len(d)
    if k < 2:
        return TTestResult(float(d.mean()) if k else math.nan, math.nan, math.nan, max(k - 1, 0), math.nan)
    mean = float(d.mean())
    var = float(d.var(ddof=1))
    se = math.sqrt((1.0 / k + n_test / n_train) * var)
    if var == 0.0:
        # Identical differences in every fold: no spread to test against.
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
        p = 1.0 if mean == 0.0 else 0.0
    else:
        t = mean / se
        p = float(2.0 * sps.t.sf(abs(t), df=k - 1))
    half = float(sps.t.ppf(0.5 + level / 2.0, df=k - 1)) * se
    return TTestResult(mean_diff=mean, sd_diff=math.sqrt(var), t=float(t), df=k - 1, p=float(p),
                       ci_low=mean - half, ci_high=mean + half)


@dataclass
class BootstrapResult:
    """Paired bootstrap of a score difference a - b over the same test items."""

    mean_diff: float  # the observed difference on all items
    ci_low: float
    ci_high: float
    p: float  # two-sided
    n: int  # test items
    resamples: int

    def to_dict(self) -> dict:
        return asdict(self)


def _balanced_accuracy_rows(y: np.ndarray, correct: np.ndarray, num_classes: int) -> np.ndarray:
    """Balanced accuracy of each row of a resample: y [R, N] labels, correct [R, N] 0/1 -> [R]."""
    recalls = []
    for c in range(num_classes):
        in_c = y == c
        n_c = in_c.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            recalls.append(np.where(n_c > 0, (correct * in_c).sum(1) / n_c, np.nan))
    return np.nanmean(np.stack(recalls, axis=1), axis=1)


def paired_bootstrap(y_true: list[int] | np.ndarray, pred_a: list[int] | np.ndarray, pred_b: list[int] | np.ndarray,
                     num_classes: int, resamples: int = 4000, level: float = 0.95, seed: int = 0) -> BootstrapResult:
    """Paired bootstrap over test items of balanced accuracy(a) - balanced accuracy(b).

    Items are resampled with replacement within each class (the class mix of the test set is fixed by design),
    the same items for both predictors; the interval is the percentile interval and the two-sided p-value is
    2 x the smaller share of resampled differences on either side of zero. It measures the uncertainty from
    the test subjects for these predictors, not from training them again.

    Args:
        y_true: true class per item [N].
        pred_a, pred_b: predicted class per item [N] of the two predictors.
        num_classes: number of classes.
        resamples: bootstrap resamples.
        level: confidence level of the interval.
        seed: seed of the resampling.
    """
    y = np.asarray(y_true, dtype=int)
    hit_a = (np.asarray(pred_a, dtype=int) == y).astype(float)
    hit_b = (np.asarray(pred_b, dtype=int) == y).astype(float)
    observed = float(balanced_accuracy_score(y, pred_a) - balanced_accuracy_score(y, pred_b))
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(y == c), size=(resamples, int((y == c).sum())))
                          for c in np.unique(y)], axis=1)  # [R, N]: a stratified resample per row
    yr = y[idx]
    d = _balanced_accuracy_rows(yr, hit_a[idx], num_classes) - _balanced_accuracy_rows(yr, hit_b[idx], num_classes)
    lo, hi = np.quantile(d, [0.5 - level / 2.0, 0.5 + level / 2.0])
    # (count + 1) / (R + 1): a bootstrap p-value is never exactly 0
    tail = min((d <= 0).sum(), (d >= 0).sum())
    p = min(1.0, 2.0 * (tail + 1) / (resamples + 1))
    return BootstrapResult(mean_diff=observed, ci_low=float(lo), ci_high=float(hi), p=float(p), n=int(len(y)),
                           resamples=resamples)


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error control; NaNs are left out of the family).

    scipy offers only false-discovery-rate control (false_discovery_control), hence this.
    """
    p = np.asarray(pvalues, dtype=float)
    ok = np.flatnonzero(~np.isnan(p))
    out = np.full(len(p), math.nan)
    m = len(ok)
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def equivalent_subjects(curve_n: list[float], curve_score: list[float], score: float) -> tuple[float, bool]:
    """Real training subjects a classifier would need to reach `score`, read off a learning curve.

    Linear interpolation between the curve's points (sorted by n; the scores are made non-decreasing
    with a running maximum, so noise cannot make the answer ambiguous); beyond the curve the end
    segment's slope is extended.

    Args:
        curve_n: training subjects at each point (e.g. 50 / 75 / 100 % of a fold).
        curve_score: score (e.g. test balanced accuracy) at each point.
        score: the score to place on the curve.
    Returns:
        (subjects, extrapolated): extrapolated is True when `score` lies outside the curve's range
        (subjects is then NaN if the end segment is flat).
    """
    order = np.argsort(curve_n)
    n = np.asarray(curve_n, dtype=float)[order]
    s = np.maximum.accumulate(np.asarray(curve_score, dtype=float)[order])
    if len(n) < 2 or math.isnan(score):
        return math.nan, True
    if s[0] <= score <= s[-1]:
        i = int(np.searchsorted(s, score, side="left"))
        if i == 0:
            return float(n[0]), False
        if s[i] == s[i - 1]:
            return float(n[i - 1]), False
        return float(n[i - 1] + (score - s[i - 1]) * (n[i] - n[i - 1]) / (s[i] - s[i - 1])), False
    lo, hi = (0, 1) if score < s[0] else (len(n) - 2, len(n) - 1)
    slope = (s[hi] - s[lo]) / (n[hi] - n[lo])
    if slope <= 0:
        return math.nan, True
    return float(n[hi] + (score - s[hi]) / slope), True


def macro_ovr_auc(y_true: np.ndarray, prob: np.ndarray) -> float:
    """Macro one-vs-rest ROC AUC over the classes present in y_true (NaN if fewer than two are).

    Computed per class with sklearn's binary roc_auc_score because the multi-class form refuses a
    y_true that lacks one of the probability columns' classes.
    """
    y_true = np.asarray(y_true)
    aucs = []
    for c in range(prob.shape[1]):
        pos = y_true == c
        if pos.any() and (~pos).any():
            aucs.append(roc_auc_score(pos.astype(int), prob[:, c]))
    return float(np.mean(aucs)) if len(aucs) >= 1 and len(np.unique(y_true)) >= 2 else math.nan


def classification_metrics(y_true: list[int] | np.ndarray, prob: list | np.ndarray, num_classes: int) -> dict:
    """Accuracy, balanced accuracy, macro ROC AUC, per-class recall and the confusion matrix.

    Args:
        y_true: true class per item [N].
        prob: class probabilities [N, num_classes].
        num_classes: number of classes (absent classes get recall NaN).
    """
    y_true = np.asarray(y_true, dtype=int)
    prob = np.asarray(prob, dtype=float).reshape(len(y_true), num_classes)
    pred = prob.argmax(1)
    labels = list(range(num_classes))
    present = np.isin(labels, y_true)
    recall = recall_score(y_true, pred, labels=labels, average=None, zero_division=0)
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, pred)) if len(y_true) else math.nan,
        "macro_auc": macro_ovr_auc(y_true, prob),
        "recall": [float(r) if p else math.nan for r, p in zip(recall, present, strict=True)],
        "confusion": confusion_matrix(y_true, pred, labels=labels).tolist(),
    }


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample SD (ddof=1; NaN for a single value), ignoring NaNs."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan
