"""The cv-evaluate report: aggregate per-fold arm results into results.json/.csv/.md and PNG plots.

Per arm: validation and test accuracy mean ± SD over folds, balanced accuracy, macro ROC AUC,
per-class recall (test), summed confusion matrices, the fold ensemble on the test set (mean of the fold
models' probabilities), and the paired difference in balanced accuracy to "real only" with the corrected
resampled t-test (Nadeau & Bengio) and its 95 % interval. The correction's n_test / n_train is the
cross-validation's validation / training ratio for both roles: it models the overlap of the folds'
training sets, which is the same whichever set is scored. Beside it, the fold ensembles of the arm and of
real only are compared on the shared test subjects by a stratified paired bootstrap (uncertainty from the
test subjects only). p-values are Holm-adjusted (each test separately) across the family of augmentation
claims (every arm except real only, the linear baseline, the learning curve and TSTR). results.md opens
with the verdict (see `verdict`).
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

import numpy as np

from medgen.evaluation.stats import (
    classification_metrics,
    corrected_resampled_ttest,
    equivalent_subjects,
    holm,
    mean_sd,
    paired_bootstrap,
)

REFERENCE = "real"
METRIC = "balanced_accuracy"  # the endpoint of every comparison
NOT_CLAIMS = ("real", "linear", "curve", "tstr")  # arm kinds outside the Holm family


def _summary(values: list[float]) -> dict[str, Any]:
    m, s = mean_sd(values)
    return {"mean": m, "sd": s, "values": values}


def _ensemble_prob(per: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray] | None:
    """(labels [N], the fold models' mean test probabilities [N, classes]); None unless every fold scored the
    same test subjects."""
    preds = [p.get("test_predictions") for p in per]
    if not preds or any(q is None for q in preds) or len({len(q["y"]) for q in preds}) != 1:
        return None
    if any(q["y"] != preds[0]["y"] for q in preds):
        return None
    return np.asarray(preds[0]["y"]), np.mean([np.asarray(q["prob"], dtype=float) for q in preds], axis=0)


def _set_holm(family: list[dict[str, Any]], key: str) -> None:
    """Holm-adjust the p-values of arm[key] across `family` (stored as arm[key]["p_holm"])."""
    for a, p in zip(family, holm([a[key]["p"] for a in family]), strict=True):
        a[key]["p_holm"] = p


def build_results(fold_results: list[dict[str, Any]], class_names: list[str],
                  notes: list[str] | None = None) -> dict[str, Any]:
    """Aggregate fold results (fold_k/fold.json contents, all folds) into one results dict."""
    folds = sorted(fold_results, key=lambda f: f["fold"])
    keys = [k for k in folds[0]["arms"] if all(k in f["arms"] for f in folds)]
    n_train = float(np.mean([f["n_train"] for f in folds]))
    n_val = float(np.mean([f["n_val"] for f in folds]))
    n_test = float(np.mean([f["n_test"] for f in folds]))
    ref = [f["arms"][REFERENCE] for f in folds] if REFERENCE in keys else None
    ens_ref = _ensemble_prob(ref) if ref is not None else None
    arms = []
    for key in keys:
        per = [f["arms"][key] for f in folds]
        row: dict[str, Any] = {k: per[0].get(k) for k in ("arm", "label", "generator", "fraction", "augment")}
        row["kind"] = per[0].get("kind", "tstr" if per[0]["generator"] and per[0]["fraction"] >= 1.0
                                  else "synthetic" if per[0]["generator"] else "real")
        row["tstr"] = row["kind"] == "tstr"
        row["generators"] = sorted({p["generator"] for p in per if p.get("generator")})
        row["n_synthetic_mean"] = float(np.mean([p["n_synthetic"] for p in per]))
        row["n_real_mean"] = float(np.mean([p["n_real"] for p in per]))
        row["n_real_subjects_mean"] = float(np.mean([p.get("n_real_subjects", p["n_real"]) for p in per]))
        for role in ("val", "test"):
            for metric in ("accuracy", "balanced_accuracy", "macro_auc"):
                row[f"{role}_{metric}"] = _summary([p[role][metric] for p in per])
            recalls = np.array([p[role]["recall"] for p in per], dtype=float)  # [folds, classes]
            with np.errstate(invalid="ignore"):
                row[f"{role}_recall"] = [float(np.nanmean(recalls[:, c])) if not np.isnan(recalls[:, c]).all()
                                         else math.nan for c in range(recalls.shape[1])]
            row[f"{role}_confusion_sum"] = np.sum([p[role]["confusion"] for p in per], axis=0).tolist()
        # the fold ensemble on the shared test set (None unless every fold scored the same subjects)
        ens = _ensemble_prob(per)
        row["test_ensemble"] = classification_metrics(ens[0], ens[1], len(class_names)) if ens is not None else None
        if ref is not None and key != REFERENCE:
            for role in ("val", "test"):
                t = corrected_resampled_ttest([p[role][METRIC] for p in per], [r[role][METRIC] for r in ref],
                                              n_train=n_train, n_test=n_val)
                row[f"{role}_vs_real"] = t.to_dict()
            if ens is not None and ens_ref is not None and np.array_equal(ens[0], ens_ref[0]):
                b = paired_bootstrap(ens[0], ens[1].argmax(1), ens_ref[1].argmax(1), len(class_names))
                row["ensemble_vs_real"] = b.to_dict()
        arms.append(row)
    family = [a for a in arms if a["kind"] not in NOT_CLAIMS and a.get("test_vs_real")]
    _set_holm(family, "test_vs_real")
    _set_holm([a for a in family if a.get("ensemble_vs_real")], "ensemble_vs_real")
    results = {"class_names": list(class_names), "folds": len(folds), "metric": METRIC, "n_train_mean": n_train,
               "n_val_mean": n_val, "n_test": n_test, "reference": REFERENCE if ref is not None else None,
               "notes": list(notes or []), "arms": arms}
    results["learning_curve"] = _learning_curve(arms)
    results["generators"] = _generator_summaries(folds, arms, results["learning_curve"], class_names)
    results["controls"] = _controls(arms)
    results["verdict"] = verdict(results)
    return results


def _arm(arms: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    return next((a for a in arms if a["arm"] == key), None)


def _learning_curve(arms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Real-only test balanced accuracy against training subjects (the curve arms and real only)."""
    pts = [a for a in arms if a["kind"] == "curve"] + [a for a in arms if a["kind"] == "real"]
    return [{"arm": a["arm"], "subjects": a["n_real_subjects_mean"], "test_balanced_accuracy": a["test_balanced_accuracy"]["mean"]}
            for a in sorted(pts, key=lambda a: a["n_real_subjects_mean"])]


def _equivalent(curve: list[dict[str, Any]], score: float) -> dict[str, Any] | None:
    if len(curve) < 2:
        return None
    n, extrapolated = equivalent_subjects([c["subjects"] for c in curve], [c["test_balanced_accuracy"] for c in curve], score)
    full = curve[-1]["subjects"]
    return {"subjects": n, "extra_subjects": n - full if not math.isnan(n) else math.nan, "extrapolated": extrapolated}


def _gain(arm: dict[str, Any]) -> dict[str, Any]:
    """An arm's comparison with real only as the verdict reads it: gain over folds, its interval, p and Holm p
    (corrected resampled t-test), and `ensemble`: the fold ensembles' gain with its test-subject bootstrap."""
    t, b = arm["test_vs_real"], arm.get("ensemble_vs_real")
    ens = {"gain": b["mean_diff"], "ci_low": b["ci_low"], "ci_high": b["ci_high"], "p": b["p"],
           "p_holm": b.get("p_holm", math.nan)} if b else None
    return {"gain": t["mean_diff"], "ci_low": t["ci_low"], "ci_high": t["ci_high"], "p": t["p"],
            "p_holm": t.get("p_holm", math.nan), "ensemble": ens}


def _generator_summaries(folds: list[dict[str, Any]], arms: list[dict[str, Any]], curve: list[dict[str, Any]],
                         class_names: list[str]) -> dict[str, Any]:
    """Per generator: its best arm (by validation balanced accuracy), gain, oracle share, equivalents, TSTR,
    class agreement."""
    out: dict[str, Any] = {}
    names = sorted({a["generator"] for a in arms if a["kind"] == "synthetic"},
                   key=lambda g: [a["generator"] for a in arms].index(g))
    for g in names:
        cands = [a for a in arms if a["kind"] == "synthetic" and a["generator"] == g and a.get("test_vs_real")]
        best = max(cands, key=lambda a: a["val_balanced_accuracy"]["mean"])
        t = best["test_vs_real"]
        oracle = _arm(arms, f"oracle_f{int(round(100 * best['fraction']))}")
        share = None
        if oracle is not None and oracle.get("test_vs_real") and oracle["test_vs_real"]["mean_diff"] > 0:
            share = t["mean_diff"] / oracle["test_vs_real"]["mean_diff"]
        tstr = _arm(arms, f"tstr_{g}")
        agreement = [f.get("generators", {}).get(g, {}).get("class_agreement") for f in folds]
        agreement = [a for a in agreement if a]
        per_class = np.mean(agreement, axis=0).tolist() if agreement else None
        out[g] = {
            "best_arm": best["arm"], "best_arm_label": best["label"], **_gain(best),
            "oracle_arm": oracle["arm"] if oracle else None, "oracle_share": share,
            "equivalent": _equivalent(curve, best["test_balanced_accuracy"]["mean"]) if curve else None,
            "tstr_test_balanced_accuracy": tstr["test_balanced_accuracy"] if tstr else None,
            "class_agreement": dict(zip(class_names, per_class, strict=True)) if per_class else None,
            "class_agreement_mean": float(np.mean(per_class)) if per_class else None,
        }
    return out


def _controls(arms: list[dict[str, Any]]) -> dict[str, Any]:
    def gain(a: dict[str, Any] | None) -> dict[str, Any] | None:
        if a is None or not a.get("test_vs_real"):
            return None
        return {"arm": a["arm"], "label": a["label"], **_gain(a), "generators": a.get("generators", [])}

    real, linear = _arm(arms, REFERENCE), _arm(arms, "linear")
    return {
        "oracle": [gain(a) for a in arms if a["kind"] == "oracle"],
        "permuted": gain(next((a for a in arms if a["kind"] == "permuted"), None)),
        "augmentation": gain(next((a for a in arms if a["kind"] == "aug"), None)),
        "linear": {"test_balanced_accuracy": linear["test_balanced_accuracy"]["mean"],
                   "cnn_minus_linear": real["test_balanced_accuracy"]["mean"] - linear["test_balanced_accuracy"]["mean"]}
        if linear and real else None,
    }


def perm_fraction(arms: list[dict[str, Any]]) -> float:
    return next((a["fraction"] for a in arms if a["kind"] == "permuted"), math.nan)


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def _claim(g: dict[str, Any]) -> str:
    text = (f"{_pts(g['gain'])} points (95% CI {_pts(g['ci_low'])} to {_pts(g['ci_high'])}), "
            f"Holm-adjusted p = {g['p_holm']:.3g}")
    e = g.get("ensemble")
    if e:
        text += (f"; fold ensembles {_pts(e['gain'])} (test-subject bootstrap 95% CI {_pts(e['ci_low'])} to "
                 f"{_pts(e['ci_high'])}, Holm p = {e['p_holm']:.3g})")
    return text


def verdict(results: dict[str, Any]) -> list[str]:
    """Plain sentences, one per generator and control, with gains in test balanced accuracy points."""
    arms = results["arms"]
    real = _arm(arms, REFERENCE)
    if real is None:
        return []
    ens = (real.get("test_ensemble") or {}).get("balanced_accuracy")
    ens_text = f"; the {results['folds']} fold models' ensemble {100 * ens:.1f}%" if ens is not None else ""
    lines = [f"Real only: test balanced accuracy {100 * real['test_balanced_accuracy']['mean']:.1f}% "
             f"(± {100 * (real['test_balanced_accuracy']['sd'] or 0):.1f} over {results['folds']} folds{ens_text}; "
             f"chance {100 / len(results['class_names']):.1f}%)."]
    ctrl = results["controls"]
    if ctrl.get("linear"):
        lin = ctrl["linear"]
        lines.append(f"Linear baseline (voxel PCA + logistic): {100 * lin['test_balanced_accuracy']:.1f}%; the CNN "
                     f"adds {_pts(lin['cnn_minus_linear'])} points.")
    oracle_power = None
    for o in ctrl.get("oracle") or []:
        if o is None:
            continue
        sig = o["p_holm"] < 0.05
        ens_sig = bool(o.get("ensemble")) and o["ensemble"]["p_holm"] < 0.05 and o["ensemble"]["gain"] > 0
        oracle_power = sig if oracle_power is None else (oracle_power or sig)
        if sig:
            what = "."
        elif ens_sig:
            what = (" — not significant across folds, significant for the fold ensembles on these test subjects "
                    "(that bootstrap leaves out the variation between training runs): gains of this size are at "
                    "the edge of what the experiment can see.")
        else:
            what = (" — not significant: the experiment has no power to see augmentation gains of this size at "
                    "this sample size.")
        lines.append(f"Positive control, {o['label']}: {_claim(o)}{what}")
    if not ctrl.get("oracle"):
        lines.append("No oracle arm (not phantom data): there is no ceiling to compare gains against.")
    for name, g in results["generators"].items():
        parts = [f"{name} ({g['best_arm_label']}, chosen on validation): {_claim(g)}"]
        if g["oracle_share"] is not None:
            parts.append(f"{100 * g['oracle_share']:.0f}% of the oracle gain")
        eq = g["equivalent"]
        if eq and not math.isnan(eq["extra_subjects"]):
            approx = " (extrapolated beyond the learning curve)" if eq["extrapolated"] else ""
            parts.append(f"worth {eq['extra_subjects']:+.0f} real subjects{approx}")
        if g["tstr_test_balanced_accuracy"]:
            parts.append(f"TSTR {100 * g['tstr_test_balanced_accuracy']['mean']:.1f}%")
        if g["class_agreement_mean"] is not None:
            parts.append(f"class agreement {100 * g['class_agreement_mean']:.0f}%")
        lines.append("; ".join(parts) + ".")
    perm = ctrl.get("permuted")
    if perm:
        gens = perm["generators"]
        same = _arm(arms, f"{gens[0]}_f{int(round(100 * perm_fraction(arms)))}") if gens else None
        real_gain = same["test_vs_real"]["mean_diff"] if same and same.get("test_vs_real") else math.nan
        if math.isnan(real_gain) or real_gain <= 0:
            what = f"the same volumes with their real labels gain {_pts(real_gain)}: there is no gain to attribute"
        elif perm["gain"] >= 0.5 * real_gain:
            what = (f"at least half the {_pts(real_gain)} points of the real labels: the gain is mostly "
                    "regularisation, not class information")
        else:
            what = (f"less than half the {_pts(real_gain)} points of the real labels: the gain carries class "
                    "information")
        lines.append(f"Negative control, synthetic volumes with permuted labels ({', '.join(gens) or '?'}): "
                     f"{_claim(perm)} — {what}.")
    aug = ctrl.get("augmentation")
    if aug:
        lines.append(f"Classical augmentation (3-12 mm shifts, ±6° axial rotation): {_claim(aug)}.")
    return lines


def _pm(s: dict[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    if s["mean"] is None or math.isnan(s["mean"]):
        return "n/a"
    sd = "" if s["sd"] is None or math.isnan(s["sd"]) else f" ± {scale * s['sd']:.{digits}f}"
    return f"{scale * s['mean']:.{digits}f}{sd}"


def _diff(t: dict[str, Any] | None) -> str:
    if not t:
        return "—"
    d = 100 * t["mean_diff"]
    holm_p = t.get("p_holm")
    hp = "" if holm_p is None or math.isnan(holm_p) else f", Holm {holm_p:.3g}"
    return (f"{0.0 if abs(d) < 0.05 else d:+.1f} [{100 * t['ci_low']:+.1f}, {100 * t['ci_high']:+.1f}] "
            f"(p={t['p']:.3g}{hp})")


def _pct(m: dict[str, Any] | None, key: str = "balanced_accuracy") -> str:
    return "n/a" if not m or m.get(key) is None or math.isnan(m[key]) else f"{100 * m[key]:.1f}"


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows of the summary table (percent, mean ± SD over folds)."""
    names = results["class_names"]
    header = ["arm", "val bal. acc", "test acc", "test bal. acc", "ensemble bal. acc", "test AUC",
              *[f"recall {n}" for n in names], "Δ test bal. acc vs real [95% CI] (p)",
              "Δ ensemble [bootstrap 95% CI] (p)"]
    rows = []
    for a in results["arms"]:
        rows.append([a["label"], _pm(a["val_balanced_accuracy"]), _pm(a["test_accuracy"]),
                     _pm(a["test_balanced_accuracy"]), _pct(a.get("test_ensemble")),
                     _pm(a["test_macro_auc"], 1.0, 3),
                     *["n/a" if math.isnan(r) else f"{100 * r:.1f}" for r in a["test_recall"]],
                     _diff(a.get("test_vs_real")), _diff(a.get("ensemble_vs_real"))])
    return header, rows


def to_markdown(results: dict[str, Any]) -> str:
    header, rows = table_rows(results)
    lines = ["# cv-evaluate results", "", "## Verdict", ""]
    lines += [f"- {v}" for v in results.get("verdict", [])]
    lines += [
        "",
        "## Arms",
        "",
        f"{results['folds']}-fold cross-validation by subject; every fold's model is scored on the same held-out "
        f"test set of {results['n_test']:.0f} volumes; {results['n_train_mean']:.0f} real training volumes per fold "
        "(mean). Percent, mean ± SD over folds; ensemble: the fold models' mean test probabilities. Δ: mean paired "
        "difference in test balanced accuracy to \"real only\" (points) with the 95% interval and p-value of the "
        "corrected resampled t-test (Nadeau & Bengio 2003, df = folds - 1, n_test/n_train = validation/training "
        "fold sizes) and the Holm-adjusted p across the augmentation arms and controls; Δ ensemble: the same for "
        "the fold ensembles, from a paired bootstrap over the test subjects (stratified by class, 4000 resamples; "
        "it leaves out the variation between training runs). TSTR: trained on "
        "synthetic volumes only, tested on real ones.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if results.get("learning_curve"):
        lines += ["", "## Learning curve (real only)", "", "| training subjects | test bal. acc |", "|---|---|"]
        lines += [f"| {c['subjects']:.0f} | {100 * c['test_balanced_accuracy']:.1f} |" for c in results["learning_curve"]]
    if results.get("generators"):
        lines += ["", "## Generators", "", "| generator | best arm (validation) | gain [95% CI] | Holm p | oracle share | "
                  "real-subject equivalent | TSTR bal. acc | class agreement |", "|---|---|---|---|---|---|---|---|"]
        for name, g in results["generators"].items():
            eq = g["equivalent"]
            eq_s = "n/a" if not eq or math.isnan(eq["extra_subjects"]) else f"{eq['extra_subjects']:+.0f}" + (" (extrap.)" if eq["extrapolated"] else "")
            agree = g["class_agreement"]
            agree_s = "n/a" if not agree else ", ".join(f"{k} {100 * v:.0f}%" for k, v in agree.items())
            lines.append(f"| {name} | {g['best_arm_label']} | {_pts(g['gain'])} [{_pts(g['ci_low'])}, {_pts(g['ci_high'])}] | "
                         f"{g['p_holm']:.3g} | {_share(g)} | "
                         f"{eq_s} | {_pm(g['tstr_test_balanced_accuracy']) if g['tstr_test_balanced_accuracy'] else 'n/a'} | {agree_s} |")
    if results.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def _share(g: dict[str, Any]) -> str:
    return "n/a" if g["oracle_share"] is None else f"{100 * g['oracle_share']:.0f}%"


def to_csv(results: dict[str, Any]) -> str:
    names = results["class_names"]
    fields = ["arm", "label", "kind", "generator", "fraction", "augment", "tstr"]
    metrics = [f"{role}_{m}" for role in ("val", "test") for m in ("accuracy", "balanced_accuracy", "macro_auc")]
    header = fields + [f"{m}_{s}" for m in metrics for s in ("mean", "sd")] + [f"test_recall_{n}" for n in names]
    header += ["test_ensemble_balanced_accuracy"]
    header += [f"{role}_vs_real_{k}" for role in ("val", "test") for k in ("mean_diff", "ci_low", "ci_high", "t", "p")]
    header += ["test_vs_real_p_holm"]
    header += [f"ensemble_vs_real_{k}" for k in ("mean_diff", "ci_low", "ci_high", "p", "p_holm")]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for a in results["arms"]:
        row = [a.get(f) for f in fields]
        row += [a[m][s] for m in metrics for s in ("mean", "sd")]
        row += a["test_recall"]
        row += [(a.get("test_ensemble") or {}).get("balanced_accuracy", "")]
        for role in ("val", "test"):
            t = a.get(f"{role}_vs_real") or {}
            row += [t.get(k, "") for k in ("mean_diff", "ci_low", "ci_high", "t", "p")]
        row += [(a.get("test_vs_real") or {}).get("p_holm", "")]
        e = a.get("ensemble_vs_real") or {}
        row += [e.get(k, "") for k in ("mean_diff", "ci_low", "ci_high", "p", "p_holm")]
        w.writerow(row)
    return buf.getvalue()


