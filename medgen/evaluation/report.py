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
import sys
from pathlib import Path
from typing import Any

import numpy as np

from medgen.evaluation.stats import corrected_resampled_ttest, mean_sd
from medgen.outputs import atomic_write_bytes, atomic_write_json, atomic_write_text

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


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plot_accuracy(results: dict[str, Any]) -> bytes:
    """Bar chart: validation and test accuracy per arm, error bars = SD over folds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = results["arms"]
    x = np.arange(len(arms))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(arms) + 2), 4))
    for i, (role, name) in enumerate((("val", "validation"), ("test", "test"))):
        means = [a[f"{role}_accuracy"]["mean"] for a in arms]
        sds = [0 if a[f"{role}_accuracy"]["sd"] is None or math.isnan(a[f"{role}_accuracy"]["sd"])
               else a[f"{role}_accuracy"]["sd"] for a in arms]
        ax.bar(x + (i - 0.5) * 0.38, means, 0.38, yerr=sds, capsize=3, label=name)
    ax.axhline(1.0 / len(results["class_names"]), color="grey", lw=0.8, ls="--", label="chance")
    ax.set_xticks(x, [a["label"] for a in arms], rotation=60, ha="right")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"Accuracy per arm (mean ± SD over {results['folds']} folds)")
    ax.legend(fontsize=8)
    data = _png(fig)
    plt.close(fig)
    return data


def plot_confusions(results: dict[str, Any]) -> bytes:
    """Grid of summed (over folds) test confusion matrices, one per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = results["arms"]
    names = results["class_names"]
    cols = min(4, len(arms))
    rows = int(math.ceil(len(arms) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, a in zip(axes.flat, arms, strict=False):
        cm = np.array(a["test_confusion_sum"])
        ax.axis("on")
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                    color="white" if v > (cm.max() + cm.min()) / 2 else "black")
        ax.set_xticks(range(len(names)), names, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_title(a["label"], fontsize=9)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("true", fontsize=7)
    fig.suptitle("Test confusion matrices, summed over folds")
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def print_table(results: dict[str, Any]) -> None:
    """Print the summary table to stdout (rich)."""
    from rich.console import Console
    from rich.table import Table

    header, rows = table_rows(results)
    table = Table(title=f"cv-evaluate: {results['folds']} folds (accuracy %, mean ± SD)")
    for h in header:
        table.add_column(h, justify="left" if h == "arm" else "right")
    for r in rows:
        table.add_row(*r)
    Console(file=sys.stdout, width=200).print(table)


def write_report(out: str | Path, results: dict[str, Any], echo: bool = False) -> None:
    """Write results.json, results.csv, results.md, accuracy.png and confusion.png (each atomically)."""
    out = Path(out)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.csv", to_csv(results))
    atomic_write_text(out / "results.md", to_markdown(results))
    atomic_write_bytes(out / "accuracy.png", plot_accuracy(results))
    atomic_write_bytes(out / "confusion.png", plot_confusions(results))
    if echo:
        print_table(results)
