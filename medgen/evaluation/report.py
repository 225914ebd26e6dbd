"""The cv-evaluate report: aggregate per-fold arm results into results.json/.csv/.md and PNG plots.

Per arm: validation and test accuracy mean ± SD over folds, balanced accuracy, macro ROC AUC,
per-class recall (test), summed confusion matrices, and the paired difference to "real only" with
the corrected resampled t-test (Nadeau & Bengio). For the t-test n_train is the mean number of real
training volumes per fold and n_test the size of the evaluated set (validation fold or test set).
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

import numpy as np

from medgen.evaluation.stats import corrected_resampled_ttest, mean_sd

REFERENCE = "real"


def _summary(values: list[float]) -> dict[str, Any]:
    m, s = mean_sd(values)
    return {"mean": m, "sd": s, "values": values}


def build_results(fold_results: list[dict[str, Any]], class_names: list[str]) -> dict[str, Any]:
    """Aggregate fold results (fold_k/fold.json contents, all folds) into one results dict."""
    folds = sorted(fold_results, key=lambda f: f["fold"])
    keys = list(folds[0]["arms"])
    n_train = float(np.mean([f["n_train"] for f in folds]))
    n_val = float(np.mean([f["n_val"] for f in folds]))
    n_test = float(np.mean([f["n_test"] for f in folds]))
    ref = [f["arms"][REFERENCE] for f in folds] if REFERENCE in keys else None
    arms = []
    for key in keys:
        per = [f["arms"][key] for f in folds]
        row: dict[str, Any] = {k: per[0][k] for k in ("arm", "label", "generator", "fraction", "augment")}
        row["tstr"] = bool(per[0]["generator"]) and per[0]["fraction"] >= 1.0
        row["n_synthetic_mean"] = float(np.mean([p["n_synthetic"] for p in per]))
        for role in ("val", "test"):
            for metric in ("accuracy", "balanced_accuracy", "macro_auc"):
                row[f"{role}_{metric}"] = _summary([p[role][metric] for p in per])
            recalls = np.array([p[role]["recall"] for p in per], dtype=float)  # [folds, classes]
            with np.errstate(invalid="ignore"):
                row[f"{role}_recall"] = [float(np.nanmean(recalls[:, c])) if not np.isnan(recalls[:, c]).all()
                                         else math.nan for c in range(recalls.shape[1])]
            row[f"{role}_confusion_sum"] = np.sum([p[role]["confusion"] for p in per], axis=0).tolist()
        if ref is not None and key != REFERENCE:
            for role, n_eval in (("val", n_val), ("test", n_test)):
                t = corrected_resampled_ttest([p[role]["accuracy"] for p in per],
                                              [r[role]["accuracy"] for r in ref], n_train=n_train, n_test=n_eval)
                row[f"{role}_vs_real"] = t.to_dict()
        arms.append(row)
    return {"class_names": list(class_names), "folds": len(folds), "n_train_mean": n_train, "n_val_mean": n_val,
            "n_test": n_test, "reference": REFERENCE if ref is not None else None, "arms": arms}


def _pm(s: dict[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    if s["mean"] is None or math.isnan(s["mean"]):
        return "n/a"
    sd = "" if s["sd"] is None or math.isnan(s["sd"]) else f" ± {scale * s['sd']:.{digits}f}"
    return f"{scale * s['mean']:.{digits}f}{sd}"


def _diff(t: dict[str, Any] | None) -> str:
    if not t:
        return "—"
    d = 100 * t["mean_diff"]
    return f"{0.0 if abs(d) < 0.05 else d:+.1f} (p={t['p']:.3g})"


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows of the summary table (percent, mean ± SD over folds)."""
    names = results["class_names"]
    header = ["arm", "val acc", "test acc", "test bal. acc", "test AUC",
              *[f"recall {n}" for n in names], "Δ val vs real", "Δ test vs real"]
    rows = []
    for a in results["arms"]:
        rows.append([a["label"], _pm(a["val_accuracy"]), _pm(a["test_accuracy"]), _pm(a["test_balanced_accuracy"]),
                     _pm(a["test_macro_auc"], 1.0, 3),
                     *["n/a" if math.isnan(r) else f"{100 * r:.1f}" for r in a["test_recall"]],
                     _diff(a.get("val_vs_real")), _diff(a.get("test_vs_real"))])
    return header, rows


def to_markdown(results: dict[str, Any]) -> str:
    header, rows = table_rows(results)
    lines = [
        "# cv-evaluate results",
        "",
        f"{results['folds']}-fold cross-validation by subject; held-out test set of {results['n_test']:.0f} volumes "
        f"evaluated once per fold and arm; {results['n_train_mean']:.0f} real training volumes per fold (mean). "
        "Accuracies in percent, mean ± SD over folds. Δ: paired mean difference in accuracy to \"real only\" "
        "(percentage points) with the corrected resampled t-test p-value (Nadeau & Bengio 2003, df = folds - 1). "
        "TSTR: classifier trained on synthetic volumes only, tested on real ones.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(results: dict[str, Any]) -> str:
    names = results["class_names"]
    fields = ["arm", "label", "generator", "fraction", "augment", "tstr"]
    metrics = [f"{role}_{m}" for role in ("val", "test") for m in ("accuracy", "balanced_accuracy", "macro_auc")]
    header = fields + [f"{m}_{s}" for m in metrics for s in ("mean", "sd")] + [f"test_recall_{n}" for n in names]
    header += [f"{role}_vs_real_{k}" for role in ("val", "test") for k in ("mean_diff", "t", "p")]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for a in results["arms"]:
        row = [a[f] for f in fields]
        row += [a[m][s] for m in metrics for s in ("mean", "sd")]
        row += a["test_recall"]
        for role in ("val", "test"):
            t = a.get(f"{role}_vs_real") or {}
            row += [t.get("mean_diff", ""), t.get("t", ""), t.get("p", "")]
        w.writerow(row)
    return buf.getvalue()


