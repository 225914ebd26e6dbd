"""The evaluate-synth pipeline: synthesis quality of a checkpoint against real data, per class and overall.

Samples the checkpoint, trains the small feature classifier on the real data (for the Frechet distance) and
applies the measurements of medgen.evaluation.metrics: diversity, distances, memorisation and the class
fidelity of issue 12 (class agreement, the real-vs-synthetic two-sample test, precision / recall / density /
coverage, disease effects recovered), each beside its real-vs-real reference value. With `out`, also writes
metrics.json, metrics.md (the tables) and PNGs (montage with real reference rows, effects, scores).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medgen.checkpoint import model_from_checkpoint
from medgen.config import TrainConfig
from medgen.data.dataset import ImageSet
from medgen.errors import MedgenError
from medgen.evaluation.metrics import (
    MEASURES,
    PRDC_K,
    FeatureSpace,
    anatomy_regions,
    class_agreement,
    effect_fraction,
    frechet_distance,
    leave_one_out_nn_rmse,
    mmd,
    ms_ssim_settings,
    nearest_neighbour_rmse,
    pairwise_ms_ssim,
    prdc,
    regional_measures,
    split_halves,
    tissue_levels,
    two_sample_auc,
)
from medgen.models.sampling import sample_images
from medgen.outputs import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    staged_dir,
)
from medgen.runtime import resolve_device
from medgen.training.loop import fit
from medgen.training.state import data_fingerprint
from medgen.viz import plot_effects, plot_fidelity, save_montage

MONTAGE_SYNTHETIC_PER_CLASS = 3
PRDC_KEYS = ("precision", "recall", "density", "coverage")


def feature_extractor(
    real: ImageSet,
    *,
    seed: int = 0,
    iterations: int = 200,
    batch_size: int = 8,
    base_width: int = 4,
    device: str | torch.device = "cpu",
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Train the registered "classifier" (a small MONAI ResNet) on the real data; return images -> features.

    Args:
        real: the real training images and labels.
        seed: training seed.
        iterations: training iterations of the classifier.
        batch_size: its batch size.
        base_width: ResNet width unit.
        device: training / inference device.
    Returns:
        A function mapping [N, C, *spatial] images to [N, F] pooled features (eval mode, no grad).
    """
    dev = resolve_device(device) if isinstance(device, str) else device
    train = TrainConfig(iterations=iterations, batch_size=batch_size, lr=1e-3, ema_decay=0.0, precision="fp32",
                        log_every=max(1, iterations // 5), sample_every=0, checkpoint_every=0)
    with tempfile.TemporaryDirectory(prefix="medgen-features-") as tmp:
        res = fit("classifier", real, Path(tmp) / "run", model_kwargs={"base_width": base_width, "backbone": "resnet18"},
                  train=train, device=dev, seed=seed)
        model, _ = model_from_checkpoint(res.checkpoint, ema=False)
    model.to(dev).eval()

    @torch.no_grad()
    def extract(images: torch.Tensor) -> torch.Tensor:
        feats = [model(images[i : i + 16].to(dev)).features.float().cpu() for i in range(0, images.shape[0], 16)]
        return torch.cat(feats)  # [N, F]

    return extract


def _nn_ratio(queries: torch.Tensor, train: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(nearest-neighbour RMSE of each query to `train`, leave-one-out RMSE of train[idx] to the rest of `train`)."""
    return nearest_neighbour_rmse(queries, train), leave_one_out_nn_rmse(train, idx)


def _effects(real_m: dict[str, np.ndarray], syn_m: dict[str, np.ndarray], real_labels: np.ndarray,
             syn_labels: np.ndarray, halves: tuple[np.ndarray, np.ndarray], class_names: list[str], *,
             n_boot: int, seed: int) -> dict[str, Any]:
    """Per class pair (later class vs earlier) and measure: effect_fraction, plus the real-vs-real reference
    (the effect in one half of the real subjects as a fraction of that in the other half)."""
    a_half, b_half = halves
    out: dict[str, Any] = {}
    for i in range(len(class_names)):
        for j in range(i + 1, len(class_names)):
            pair = f"{class_names[j]} vs {class_names[i]}"
            out[pair] = {}
            for name in MEASURES:
                r, s = real_m[name], syn_m[name]
                ri, rj = r[real_labels == i], r[real_labels == j]
                si, sj = s[syn_labels == i], s[syn_labels == j]
                res = effect_fraction(ri, rj, si, sj, n_boot=n_boot, seed=seed)
                in_a = np.isin(np.arange(len(r)), a_half)
                ref = effect_fraction(r[(real_labels == i) & ~in_a], r[(real_labels == j) & ~in_a],
                                      r[(real_labels == i) & in_a], r[(real_labels == j) & in_a],
                                      n_boot=n_boot, seed=seed)
                res["real_mean_a"], res["real_mean_b"] = float(ri.mean()), float(rj.mean())
                res["synthetic_mean_a"], res["synthetic_mean_b"] = (float(si.mean()) if len(si) else float("nan"),
                                                                    float(sj.mean()) if len(sj) else float("nan"))
                res["reference"] = {k: ref[k] for k in ("fraction", "fraction_low", "fraction_high")}
                out[pair][name] = res
    return out


def group_aucs(groups: dict[str, slice], real_x: np.ndarray, syn_x: np.ndarray, ref_a: np.ndarray,
               ref_b: np.ndarray, seed: int) -> dict[str, float]:
    """The two-sample AUC on each feature group alone (two_sample_auc_<group>), with its real-vs-real reference
    (two_sample_auc_<group>_real, half a vs half b)."""
    out: dict[str, float] = {}
    for group, cols in groups.items():
        out[f"two_sample_auc_{group}"] = two_sample_auc(real_x[:, cols], syn_x[:, cols], seed=seed)
        out[f"two_sample_auc_{group}_real"] = two_sample_auc(ref_a[:, cols], ref_b[:, cols], seed=seed)
    return out


def evaluate_synthesis(
    checkpoint: str | os.PathLike,
    real: ImageSet,
    *,
    n_per_class: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    n_pairs: int = 20,
    classifier_iterations: int = 200,
    extractor: Callable[[torch.Tensor], torch.Tensor] | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    n_boot: int = 2000,
    data_label: str | None = None,
) -> dict[str, Any]:
    """Per-class and overall synthesis metrics of a checkpoint against real data, each with its real reference.

    Real-vs-real references come from a seeded split of each class's real volumes into two halves (one half
    plays the synthetic set); class agreement's reference is the classifier's cross-validated recall on the
    real volumes. The class-agreement classifier is trained on all of `real`: when `real` is the generator's
    training data (the checkpoint's data fingerprint matches, recorded in settings) these are the subjects
    the generator learnt from, so synthetic volumes are judged by what the generator saw.

    Args:
        checkpoint: a checkpoint file or run folder.
        real: real images (same grid as the checkpoint, same class names).
        n_per_class: synthetic volumes per class (default: as many as real ones of that class).
        seed: seed of the synthetic latents, the pair draws, halves, folds and bootstrap.
        device: where the generator and the feature network run.
        n_pairs: MS-SSIM pairs per set.
        classifier_iterations: training iterations of the feature classifier (Frechet distance).
        extractor: features function to use instead of training one (tests).
        out: optional folder for metrics.json, metrics.md and the PNGs (refused when non-empty unless overwrite).
        overwrite: replace an existing `out` folder that medgen wrote.
        n_boot: bootstrap resamples of the effect intervals.
        data_label: recorded as result["data"] (where the real data came from).
    Returns:
        A JSON-ready dict: {"checkpoint", "model", "step", "settings", "classes": {name: metrics},
        "overall": metrics, "effects": {pair: {measure: ...}}}.
    """
    if out is not None:
        check_output_dir(out, overwrite=overwrite, inputs=[checkpoint])
    model, meta = model_from_checkpoint(checkpoint)
    names = list(meta["class_names"])
    if list(real.class_names) != names:
        raise MedgenError(f"the data's classes {real.class_names} differ from the checkpoint's {meta['class_names']}")
    shape = tuple(real.images.shape[1:])
    dev = resolve_device(device) if isinstance(device, str) else device
    probe = sample_images(model, [0], seed=seed, device=dev)
    if tuple(probe.shape[1:]) != shape:
        raise MedgenError(f"the checkpoint makes images of shape {tuple(probe.shape[1:])} but the data has {shape}")
    for k, name in enumerate(names):
        count = int((real.labels == k).sum())
        if count < 2 or (n_per_class or count) < 2:
            raise MedgenError(f"class {name!r} needs at least 2 real and 2 synthetic volumes for these metrics "
                              f"(has {count} real); the real-vs-real references need 4")
    if extractor is None:
        extractor = feature_extractor(real, seed=seed, iterations=classifier_iterations, device=dev)
    real_features = extractor(real.images)  # [N, F] (Frechet)
    space = FeatureSpace(real.images, seed=seed)
    real_x = space(real.images)  # [N, D] (class fidelity)
    real_y = real.labels.numpy()
    # per class halves, so both halves hold every class
    a_half = np.concatenate([np.flatnonzero(real_y == k)[split_halves(int((real_y == k).sum()), seed + k)[0]]
                             for k in range(len(names))])
    in_a = np.isin(np.arange(len(real)), a_half)
    halves = (a_half, np.flatnonzero(~in_a))

    synth: dict[int, torch.Tensor] = {}
    for k in range(len(names)):
        n = n_per_class or int((real.labels == k).sum())
        synth[k] = sample_images(model, [k] * n, seed=seed * 1000 + k, device=dev)
    syn_images = torch.cat([synth[k] for k in range(len(names))])
    syn_y = np.concatenate([np.full(synth[k].shape[0], k) for k in range(len(names))])
    syn_x = space(syn_images)
    agreement = class_agreement(real_x, real_y, syn_x, syn_y, len(names), seed=seed)

    classes: dict[str, Any] = {}
    for k, name in enumerate(names):
        idx = torch.nonzero(real.labels == k).flatten()
        ka, kb = np.flatnonzero((real_y == k) & in_a), np.flatnonzero((real_y == k) & ~in_a)
        real_k, syn_k = real.images[idx], synth[k]
        nn_syn, nn_real = _nn_ratio(syn_k, real.images, idx)
        b_all = np.flatnonzero(~in_a)
        nn_ref_q, nn_ref_t = _nn_ratio(real.images[ka], real.images[b_all],
                                       torch.as_tensor(np.flatnonzero(real_y[b_all] == k)))
        xk, sk = real_x[real_y == k], syn_x[syn_y == k]
        classes[name] = {
            "n_real": int(idx.numel()),
            "n_synthetic": int(syn_k.shape[0]),
            "class_agreement": agreement["synthetic"][k],
            "class_agreement_real": agreement["reference"][k],
            "two_sample_auc": two_sample_auc(xk, sk, seed=seed),
            "two_sample_auc_real": two_sample_auc(real_x[ka], real_x[kb], seed=seed),
            **group_aucs(space.groups, xk, sk, real_x[ka], real_x[kb], seed),
            **{key: v for key, v in prdc(real_x[kb], sk[: len(ka)]).items() if key in PRDC_KEYS},
            **{f"{key}_real": v for key, v in prdc(real_x[kb], real_x[ka]).items() if key in PRDC_KEYS},
            "ms_ssim_synthetic": pairwise_ms_ssim(syn_k, n_pairs=n_pairs, seed=seed),
            "ms_ssim_real": pairwise_ms_ssim(real_k, n_pairs=n_pairs, seed=seed),
            "mmd": mmd(real_k, syn_k, seed=seed),
            "mmd_real": mmd(real.images[kb], real.images[ka], seed=seed),
            "frechet": frechet_distance(real_features[idx], extractor(syn_k)),
            "frechet_real": frechet_distance(real_features[kb], real_features[ka]),
            "nn_rmse_synthetic_to_train": float(nn_syn.mean()),
            "nn_rmse_real_to_train": float(nn_real.mean()),
            "nn_ratio": float(nn_syn.mean() / nn_real.mean()),
            "nn_ratio_real": float(nn_ref_q.mean() / nn_ref_t.mean()),
            "nn_rmse_synthetic_min": float(nn_syn.min()),
        }
    a, b = halves
    n_half = len(a)
    overall = {
        "n_real": len(real),
        "n_synthetic": int(syn_images.shape[0]),
        "class_agreement": agreement["synthetic_mean"],
        "class_agreement_real": agreement["reference_mean"],
        "two_sample_auc": two_sample_auc(real_x, syn_x, seed=seed),
        "two_sample_auc_real": two_sample_auc(real_x[a], real_x[b], seed=seed),
        **group_aucs(space.groups, real_x, syn_x, real_x[a], real_x[b], seed),
        **{key: v for key, v in prdc(real_x[b], syn_x[np.random.default_rng(seed).permutation(len(syn_x))[:n_half]]).items()
           if key in PRDC_KEYS},
        **{f"{key}_real": v for key, v in prdc(real_x[b], real_x[a]).items() if key in PRDC_KEYS},
        **{key: float(np.mean([c[key] for c in classes.values()]))
           for key in ("ms_ssim_synthetic", "ms_ssim_real", "nn_ratio", "nn_ratio_real")},
        "nn_rmse_synthetic_min": float(min(c["nn_rmse_synthetic_min"] for c in classes.values())),
    }

    effects = None
    settings_effects: dict[str, Any] = {"measured": False}
    regions = None
    if real.images.ndim == 5 and real.affine is not None and shape[1] == shape[2] == shape[3]:
        regions = anatomy_regions(shape[1], real.affine)
        empty = [k for k, w in regions.weights.items() if float(w.sum()) < 1.0]
        if empty:
            settings_effects["reason"] = f"the anatomy's {', '.join(empty)} region(s) fall outside the image grid"
            regions = None
    else:
        settings_effects["reason"] = "regional measures need cubic 3D volumes with an affine"
    if regions is not None:
        levels = tissue_levels(real.images, regions, seed=seed)
        real_m = regional_measures(real.images, regions, levels)
        syn_m = regional_measures(syn_images, regions, levels)
        effects = _effects(real_m, syn_m, real_y, syn_y, halves, names, n_boot=n_boot, seed=seed)
        settings_effects = {
            "measured": True,
            "tissue_levels_csf_gm_wm": [round(v, 4) for v in levels],
            "method": "piecewise-linear CSF/GM/WM fractions from the real volumes' 3 intensity levels (1D k-means "
                      "in the template brain mask), times the phantom anatomy's soft regions (MNI, mapped with "
                      "geometry.mni_voxel_affine; ventricles grown by 4 mm), summed in mL; no learned model",
            "bootstrap": n_boot,
            "measures": {k: f"{t} in the {r} region" for k, (r, t) in MEASURES.items()},
        }
        for k, name in enumerate(names):
            for m in MEASURES:
                classes[name][f"{m}_real"] = float(real_m[m][real_y == k].mean())
                classes[name][f"{m}_synthetic"] = float(syn_m[m][syn_y == k].mean())

    kernel, weights = ms_ssim_settings(min(shape[1:]))
    train_fp = (meta.get("extra") or {}).get("data_fingerprint")
    same = train_fp is not None and train_fp == data_fingerprint(real)
    result = {
        "checkpoint": meta["path"],
        "checkpoint_sha256": meta["sha256"],
        "model": meta["model"],
        "step": meta["step"],
        "settings": {"seed": seed, "n_pairs": n_pairs, "ms_ssim_kernel": kernel,
                     "ms_ssim_weights": [round(w, 4) for w in weights], "image_shape": list(shape),
                     "classifier_iterations": classifier_iterations, "feature_dim": int(real_features.shape[1]),
                     "nn_distance": "RMSE per voxel, [-1, 1] scale",
                     "note": "the Frechet distance is noisy when a class has fewer volumes than feature_dim",
                     "fidelity_feature_space": space.description,
                     "fidelity_classifier": "scikit-learn LogisticRegression (L2, C=0.1) on the fidelity features",
                     "class_agreement_training_data": (
                         "the generator's training data (the checkpoint's data fingerprint matches)" if same else
                         "real data other than the generator's training data (the checkpoint's data fingerprint "
                         "differs or is missing)"),
                     "class_agreement_reference": f"{agreement['reference_folds']}-fold cross-validated recall on "
                                                  "the real volumes",
                     "two_sample_test": "5-fold (fewer for small sets) stratified cross-validated ROC AUC of real "
                                        "vs synthetic, out-of-fold probabilities",
                     "prdc": f"k = {PRDC_K} nearest neighbours (Naeem et al. 2020); real half B vs as many "
                             "synthetic volumes as half A, reference: half B vs half A",
                     "reference": "*_real keys: the same metric with one seeded half of the real volumes of a "
                                  "class in the synthetic role and the other half as the real set",
                     "effects": settings_effects},
        "classes": classes,
        "overall": overall,
        "effects": effects,
    }
    if data_label is not None:
        result["data"] = data_label
    if out is not None:
        write_outputs(out, result, real, synth, overwrite=overwrite, inputs=[checkpoint])
    return result


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}"


TABLE_ROWS = (  # (key, label, direction note)
    ("class_agreement", "class agreement (recall of the intended class)", "higher: carries the class"),
    ("two_sample_auc", "real vs synthetic two-sample AUC", "0.5: indistinguishable"),
    ("two_sample_auc_anatomy", "- on the anatomy features alone (PCA)", "0.5: indistinguishable"),
    ("two_sample_auc_histogram", "- on the intensity histogram alone", "0.5: indistinguishable"),
    ("two_sample_auc_texture", "- on the high-frequency energies alone", "0.5: indistinguishable"),
    ("precision", "precision (fidelity)", "high"),
    ("recall", "recall (diversity)", "high"),
    ("density", "density", "about 1"),
    ("coverage", "coverage", "high"),
    ("ms_ssim_synthetic", "MS-SSIM among pairs (diversity)", "near the real value"),
    ("mmd", "voxel MMD", "low"),
    ("frechet", "Frechet distance (classifier features)", "low"),
    ("nn_ratio", "nearest-neighbour ratio (memorisation)", "well below 1: copies"),
)


def to_markdown(result: dict[str, Any]) -> str:
    """The metric table (synthetic value, real-vs-real reference in brackets) and the effects table."""
    names = list(result["classes"])
    groups = [*names, "overall"]
    cols = {**result["classes"], "overall": result["overall"]}
    lines = [f"# Synthesis fidelity: {result['model']} (step {result['step']})", "",
             f"Checkpoint `{result['checkpoint']}` (sha256 {result['checkpoint_sha256'][:12]}).", "",
             "Each cell: synthetic value (real-vs-real reference in brackets: one half of the real volumes "
             "in the synthetic role; for MS-SSIM, the real pairs).", "",
             "| metric | " + " | ".join(groups) + " | reads |",
             "|---|" + "---|" * len(groups) + "---|"]
    for key, label, note in TABLE_ROWS:
        ref_key = "ms_ssim_real" if key == "ms_ssim_synthetic" else f"{key}_real"
        cells = [f"{_fmt(cols[g].get(key))} ({_fmt(cols[g].get(ref_key))})" if key in cols[g] else "n/a"
                 for g in groups]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {note} |")
    s = result["settings"]
    lines += ["", f"Feature space: {s['fidelity_feature_space']}. Classifier: {s['fidelity_classifier']}, trained "
              f"on {s['class_agreement_training_data']}; reference: {s['class_agreement_reference']}. "
              f"Two-sample test: {s['two_sample_test']}. PRDC: {s['prdc']}.", ""]
    if result.get("effects"):
        lines += ["## Disease effects (no learned model)", "",
                  f"{s['effects']['method']}. Effect = mean of the later class - mean of the earlier one; fraction "
                  "= synthetic effect / real effect (1 = fully recovered, 0 = none, negative = wrong sign), 95% "
                  "bootstrap interval; reference: the same fraction between two halves of the real data.", "",
                  "| pair | measure | real effect (mL, relative) | synthetic effect | fraction [95% CI] | "
                  "real half vs half [95% CI] |", "|---|---|---|---|---|---|"]
        for pair, per in result["effects"].items():
            for m, v in per.items():
                ref = v["reference"]
                lines.append(
                    f"| {pair} | {m} | {_fmt(v['real_effect'], 2)} ({_fmt(100 * v['real_relative'], 1)}%) | "
                    f"{_fmt(v['synthetic_effect'], 2)} ({_fmt(100 * v['synthetic_relative'], 1)}%) | "
                    f"{_fmt(v['fraction'], 2)} [{_fmt(v['fraction_low'], 2)}, {_fmt(v['fraction_high'], 2)}] | "
                    f"{_fmt(ref['fraction'], 2)} [{_fmt(ref['fraction_low'], 2)}, {_fmt(ref['fraction_high'], 2)}] |")
    return "\n".join(lines) + "\n"


def write_outputs(out: str | os.PathLike, result: dict[str, Any], real: ImageSet, synth: dict[int, torch.Tensor], *,
                  overwrite: bool = False, inputs: list[Any] | None = None) -> Path:
    """The --out folder: metrics.json, metrics.md, montage.png (real reference rows beside synthetic ones),
    effects.png (when measured) and fidelity.png (the per-class scores beside their references)."""
    names = list(result["classes"])
    with staged_dir(out, overwrite=overwrite, inputs=inputs or [], command="evaluate-synth") as tmp:
        atomic_write_json(tmp / "metrics.json", result)
        atomic_write_text(tmp / "metrics.md", to_markdown(result))
        ref_idx = [int(torch.nonzero(real.labels == k)[0]) for k in range(len(names))]
        shown = torch.cat([synth[k][:MONTAGE_SYNTHETIC_PER_CLASS] for k in range(len(names))])
        shown_labels = [k for k in range(len(names)) for _ in range(min(MONTAGE_SYNTHETIC_PER_CLASS, synth[k].shape[0]))]
        save_montage(shown, shown_labels, names, tmp / "montage.png",
                     title=f"{result['model']} step {result['step']}: real (green) and synthetic volumes",
                     reference=real.images[ref_idx], reference_labels=list(range(len(names))))
        if result.get("effects"):
            atomic_write_bytes(tmp / "effects.png", plot_effects(result["effects"]))
        cols = {**result["classes"], "overall": result["overall"]}
        rows = [(label, {g: cols[g][key] for g in cols},
                 {g: cols[g].get("ms_ssim_real" if key == "ms_ssim_synthetic" else f"{key}_real", float("nan"))
                  for g in cols})
                for key, label, _ in TABLE_ROWS if key not in ("frechet", "mmd")]
        atomic_write_bytes(tmp / "fidelity.png", plot_fidelity(rows))
    return Path(out)
