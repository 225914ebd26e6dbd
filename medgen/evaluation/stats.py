"""Classification metrics and the corrected resampled t-test used by the cv-evaluate report."""

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
