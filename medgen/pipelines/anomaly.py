"""`medgen anomaly`: reconstruction-error maps of an autoencoder trained on one (normal) class.

Train the autoencoder on normal subjects only (`medgen train vae --classes CN --holdout 0.25`); every checkpoint
records its training subjects, and this pipeline scores only the subjects that did not train it (the held-out
ones and, with --classes, those of the other classes), which it checks in code. Each volume is reconstructed
with the normal class as condition (vae: posterior mean; alpha-gan: G(E(x))).

Output folder (written atomically):
    metrics.json       ROC AUC of each score for each class against the normal class, counts, region shares
    scores.csv         per subject: class, anomaly scores (mean error, top-1 % error, mean and top-1 % z, the
                       latent code's Mahalanobis distance to the training codes, and the mean signed deficit
                       (reconstruction - input: darker than normal) inside a region of interest and its z)
    maps/<subject>_error.nii.gz   smoothed absolute error (model scale) with the training affine
    maps/<subject>_zmap.nii.gz    the error as a z-score against the training subjects' errors
    maps/<subject>_deficit.nii.gz the signed deficit, reconstruction - input (smoothed; model scale)
    overlays.png       input, reconstruction and error overlay for the first subjects of each class
    roc.png  scores.png  index.html

The region of interest: on phantom data the affected regions (hippocampus + ventricles, from the phantom
anatomy); on other data a mask given with `roi` (NIfTI on the training grid); without one the ROI scores are
left out. The headline score is the ROI deficit where there is an ROI (an a-priori region and direction: tissue
loss), else the whole-brain top-1 % error.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medgen.console import log
from medgen.data.dataset import ImageSet
from medgen.errors import MedgenError
from medgen.evaluation.anomaly import (
    TOP_SHARE,
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
from medgen.evaluation.metrics import anatomy_regions
from medgen.models.sampling import decode, encode
from medgen.outputs import atomic_write_bytes, check_output_dir, staged_dir
from medgen.pipelines.autoencoders import (
    brain_mask,
    checkpoint_data,
    data_label,
    load_autoencoder,
    trained_classes,
    training_subjects,
    unseen,
    volume_writer,
)
from medgen.pipelines.site import write_page_safely
from medgen.runtime import resolve_device
from medgen.viz import plot_groups, plot_roc, save_anomaly_overlays

SCORES = ("error_mean", "error_top", "z_mean", "z_top", "code_distance", "roi_deficit", "roi_deficit_z")
HEADLINE = "error_top"  # the score the page, ROC plot and summary lead with without an ROI (all in metrics.json)
HEADLINE_ROI = "roi_deficit"  # ... and with one
AFFECTED = ("hippocampus", "ventricles")  # the phantom's affected regions (medgen.data.anatomy)
OVERLAYS_PER_CLASS = 3


def _regions(ds: ImageSet, size: int) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
    """The phantom anatomy's brain mask and affected regions on the grid, or None for data that is not a phantom."""
    if not (ds.normalisation.get("source_dataset") or {}).get("phantom") or ds.affine is None:
        return None
    reg = anatomy_regions(size, ds.affine)
    mask = reg.mask > 0.5
    regions = {k: (reg.weights[k] > 0.5) & mask for k in AFFECTED}
    regions["hippocampus+ventricles"] = regions["hippocampus"] | regions["ventricles"]
    return mask, regions


def load_roi(path: str | Path, size: int) -> np.ndarray:
    """A region-of-interest mask (NIfTI, nonzero = inside) on the training grid [size]^3."""
    import nibabel as nib

    p = Path(path)
    if not p.is_file():
        raise MedgenError(f"--roi {p}: no such file")
    try:
        roi = np.asarray(nib.load(str(p)).dataobj)
    except Exception as e:  # nibabel raises several types for unreadable files
        raise MedgenError(f"--roi {p}: not a readable NIfTI mask ({type(e).__name__}: {e})") from None
    roi = np.squeeze(roi)
    if roi.shape != (size,) * 3:
        raise MedgenError(f"--roi {p}: shape {roi.shape}; the checkpoint's grid is {(size,) * 3}")
    roi = np.nan_to_num(roi.astype(np.float64)) != 0
    if not roi.any():
        raise MedgenError(f"--roi {p}: the mask is empty")
    return roi


def detect_anomalies(checkpoint: str | Path, data: str | Path | ImageSet | None, out: str | Path, *,
                     normal: str | None = None, sigma: float = 1.0, maps: bool = True, batch_size: int = 8,
                     roi: str | Path | None = None, device: str = "auto", overwrite: bool = False) -> dict[str, Any]:
    """Score every subject the checkpoint has not seen by its reconstruction error and write the results folder.

    Args:
        checkpoint: a vae or alpha-gan checkpoint or run folder, trained on the normal class.
        data: the volumes (dataset spec or ImageSet); None: the data the run trained on.
        out: output folder (refused when it exists, unless overwrite).
        normal: the normal class (default: the class the run trained on, when it trained on one).
        sigma: Gaussian smoothing of the error maps (voxels).
        maps: write the NIfTI error and z maps of every scored subject.
        batch_size: volumes per forward pass.
        roi: a NIfTI mask on the training grid for the ROI scores (default on phantom data: hippocampus +
            ventricles).
        device: auto | cpu | cuda.
        overwrite: replace an existing output folder.
    Returns:
        The metrics (also metrics.json).
    """
    inputs = [checkpoint, None if isinstance(data, ImageSet) else data, roi]
    check_output_dir(out, overwrite=overwrite, inputs=inputs)
    model, meta = load_autoencoder(checkpoint)
    names = meta["class_names"]
    trained = trained_classes(meta)
    if normal is None:
        if len(trained) != 1:
            raise MedgenError(f"checkpoint {meta['path']} trained on {len(trained)} classes ({', '.join(trained)}); "
                              "anomaly detection needs one trained on the normal class only "
                              "(medgen train vae --classes CN --holdout 0.25), or name it with --normal")
        normal = trained[0]
    if normal not in names:
        raise MedgenError(f"--normal: unknown class {normal!r}; the checkpoint has classes: {', '.join(names)}")
    if normal not in trained:
        raise MedgenError(f"--normal {normal}: the checkpoint {meta['path']} did not train on {normal} "
                          f"(it trained on {', '.join(trained)})")
    ds = checkpoint_data(meta, data)
    held, used = unseen(ds, meta)
    seen = set(ds.subjects[i] for i in used)
    if not held:
        raise MedgenError(f"every subject of the data trained the checkpoint {meta['path']}; nothing held out to "
                          "score (train with --holdout, or give --data with other subjects)")
    if used and len(used) < 2:
        used = []
    size = int(meta["kwargs"].get("image_size", 64))
    roi_mask = load_roi(roi, size) if roi is not None else None
    dev = resolve_device(device)
    k_normal = names.index(normal)
    log(f"reconstructing {len(held)} held-out and {len(used)} training volumes with condition {normal}")
    test = ds.subset(held)
    leaked = set(test.subjects) & training_subjects(meta)
    if leaked:  # the leakage check: never score a subject the model was trained on
        raise MedgenError(f"{len(leaked)} scored subject(s) trained the checkpoint (e.g. {sorted(leaked)[0]})")
    cond = [k_normal] * len(test)
    codes = encode(model, test.images, cond, batch_size=batch_size, device=dev)
    recon = decode(model, codes, cond, batch_size=batch_size, device=dev, match=False)
    err = error_maps(test.images, recon, sigma)
    deficit = deficit_maps(test.images, recon, sigma)
    anatomy = _regions(ds, size)
    mask = anatomy[0] if anatomy is not None else brain_mask(ds)
    roi_name = None
    if roi_mask is not None:
        roi_name = f"mask {Path(roi).name}"
    elif anatomy is not None:
        roi_name, roi_mask = "hippocampus+ventricles (phantom anatomy)", anatomy[1]["hippocampus+ventricles"]
    z = None
    if used:
        ref = ds.subset(used)
        ref_codes = encode(model, ref.images, [k_normal] * len(ref), batch_size=batch_size, device=dev)
        ref_recon = decode(model, ref_codes, [k_normal] * len(ref), batch_size=batch_size, device=dev, match=False)
        ref_err = error_maps(ref.images, ref_recon, sigma)
        z = normative_z(err, ref_err)
        ref_deficit = deficit_maps(ref.images, ref_recon, sigma)
    else:
        log("no training subjects in the data: the z-scores (against their errors) are left out")
    scores = {f"error_{k}": v for k, v in subject_scores(err, mask).items()}
    if z is not None:
        scores.update({f"z_{k}": v for k, v in subject_scores(z, mask).items()})
        scores["code_distance"] = code_distance(codes, ref_codes)
    if roi_mask is not None:
        scores["roi_deficit"] = region_score(deficit, roi_mask)
        if z is not None:
            scores["roi_deficit_z"] = region_score(normative_z(deficit, ref_deficit), roi_mask)
    labels = test.labels.numpy()
    is_normal = labels == k_normal
    aucs: dict[str, dict[str, Any]] = {}
    intervals: dict[str, dict[str, list[float]]] = {}
    curves: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(names):
        if c == k_normal or not (labels == c).any():
            continue
        sel = is_normal | (labels == c)
        aucs[f"{normal}_vs_{name}"], intervals[f"{normal}_vs_{name}"] = {}, {}
        for s, vals in scores.items():
            r = roc(vals[sel], labels[sel] == c)
            aucs[f"{normal}_vs_{name}"][s] = round(r["auc"], 4)
            intervals[f"{normal}_vs_{name}"][s] = [round(v, 4) for v in auc_interval(vals[sel], labels[sel] == c)]
            curves[f"{normal} vs {name} ({s})"] = r
    headline = HEADLINE_ROI if roi_mask is not None else HEADLINE
    per_class = {n: int((labels == i).sum()) for i, n in enumerate(names)}
    metrics: dict[str, Any] = {
        "checkpoint": str(meta["path"]), "model": meta["model"], "checkpoint_step": meta["step"],
        "data": data_label(meta, data),
        "normal": normal, "trained_classes": trained, "headline_score": headline,
        "scored_subjects": len(set(test.subjects)), "scored_per_class": per_class,
        "training_subjects_in_data": len(seen), "leakage_check": "no scored subject is among the checkpoint's "
                                                                "training subjects (checked)",
        "auc": aucs,
        "auc_interval": intervals,  # stratified percentile bootstrap, 95 %, 2000 replicates
        "settings": {"sigma_voxels": sigma, "top_share": TOP_SHARE, "grid": size,
                     "scores": {"error_mean": "mean absolute error over the brain",
                                "error_top": f"mean of the top {100 * TOP_SHARE:g} % brain voxels' error",
                                "z_mean": "mean voxelwise z (error against the training subjects' errors)",
                                "z_top": f"mean of the top {100 * TOP_SHARE:g} % brain voxels' z",
                                "code_distance": "Mahalanobis distance of the latent code to the training "
                                                 "subjects' codes (the encoder's view, no error map)",
                                "roi_deficit": "mean signed deficit (reconstruction - input: darker than the "
                                               "normal reconstruction, as where CSF replaces tissue) inside "
                                               "the region of interest",
                                "roi_deficit_z": "the same for the deficit as a voxelwise z against the "
                                                 "training subjects' deficits"},
                     "roi": roi_name or "none (no phantom anatomy and no --roi mask: ROI scores left out)",
                     "roi_voxels": int(np.asarray(roi_mask).sum()) if roi_mask is not None else 0},
    }
    if anatomy is not None:
        metrics["regions"] = {}
        for map_name, m in (("error", err), ("z", z), ("deficit", deficit)):
            if m is None:
                continue
            share = top_share(m, mask, anatomy[1])
            metrics["regions"][map_name] = {
                "brain_share": {k: round(v, 4) for k, v in share["brain_share"].items()},
                "top_share_per_class": {n: {k: round(float(v[labels == i].mean()), 4)
                                            for k, v in share["per_volume"].items()}
                                        for i, n in enumerate(names) if (labels == i).any()},
                "top_voxels": share["top_voxels"],
            }
    else:
        metrics["regions"] = {"reason": "region shares need the phantom anatomy (data written by medgen phantom)"}

    with staged_dir(out, overwrite=overwrite, inputs=inputs, command="anomaly") as tmp:
        write = volume_writer(meta)
        rows = []
        for i, subj in enumerate(test.subjects):
            name = Path(test.sources[i]).name.split(".")[0] if test.sources else subj
            if maps:
                write(tmp / "maps" / f"{name}_error.nii.gz", err[i], intensity=False)
                write(tmp / "maps" / f"{name}_deficit.nii.gz", deficit[i], intensity=False)
                if z is not None:
                    write(tmp / "maps" / f"{name}_zmap.nii.gz", z[i], intensity=False)
            rows.append([subj, name, names[int(labels[i])], *[round(float(scores[s][i]), 6) if s in scores else ""
                                                            for s in SCORES]])
        with open(tmp / "scores.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["subject", "scan", "class", *SCORES])
            w.writerows(rows)
        # the maps the headline score reads
        shown_map, shown_label = (deficit, "deficit") if headline.startswith("roi_") else (err, "|error|")
        picks = [i for c in range(len(names)) for i in np.nonzero(labels == c)[0][:OVERLAYS_PER_CLASS].tolist()]
        vmax = float(torch.quantile(shown_map[:, torch.from_numpy(mask)].flatten()[:2_000_000], 0.999))
        save_anomaly_overlays([(f"{test.subjects[i]} {names[int(labels[i])]}", test.images[i, 0].numpy(),
                                recon[i, 0].numpy(), np.clip(shown_map[i].numpy(), 0, None)) for i in picks],
                              tmp / "overlays.png", vmax=max(vmax, 1e-6),
                              title=f"{meta['model']} trained on {normal}: "
                                    + ("deficit, reconstruction - input" if shown_label == "deficit"
                                       else "reconstruction error"),
                              label=shown_label)
        atomic_write_bytes(tmp / "roc.png", plot_roc(
            [(k, np.asarray(v["fpr"]), np.asarray(v["tpr"]), v["auc"]) for k, v in curves.items()
             if k.endswith(f"({headline})") and v["fpr"]], title=f"ROC, score {headline}"))
        atomic_write_bytes(tmp / "scores.png", plot_groups(
            {n: scores[headline][labels == i].tolist() for i, n in enumerate(names) if (labels == i).any()},
            ylabel=headline, title=f"anomaly score per class (held-out subjects; normal = {normal})"))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        write_page_safely(tmp, "anomaly", name=Path(out).name)
    return metrics
