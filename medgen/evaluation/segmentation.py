"""Unsupervised segmentation metrics for the parallel-decoder VAE (DESIGN.md section 6).

The prediction is the argmax of the decoder weights. Scenes: foreground ARI (background ids excluded,
per image, then averaged), full ARI, mean segmentation covering, per-decoder mask area (collapse
shows as decoders with ~0 area). Volumes: Dice of decoders vs tissue classes after Hungarian matching.
Latent probe: per-decoder latents -> which shapes are present, cross-validated, next to a baseline; object
probe: each object's matched decoder latent -> the object's shape (the property-prediction protocol).
Baselines for the segmentation itself: k-means and a Gaussian mixture on pixel colour (per image, K groups).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score, balanced_accuracy_score
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

TISSUES = {1: "CSF", 2: "GM", 3: "WM"}


def argmax_segmentation(weights: torch.Tensor) -> torch.Tensor:
    """Decoder weights [B, K, 1, *S] -> segmentation [B, *S] int64 (index of the winning decoder)."""
    return weights.argmax(dim=1).squeeze(1).long()


def _flat(a: Any) -> np.ndarray:
    return np.asarray(a.cpu() if isinstance(a, torch.Tensor) else a).reshape(-1)


def foreground_ari(true: Any, pred: Any, background_ids: Sequence[int]) -> float:
    """ARI on the pixels whose true id is not a background id (nan when the image has no foreground).

    Args:
        true: true id map [*S] (instance ids and background ids).
        pred: predicted segment map [*S].
        background_ids: ids in `true` that are background (sky, floor, wall).
    """
    t, p = _flat(true), _flat(pred)
    fg = ~np.isin(t, np.asarray(list(background_ids)))
    if not fg.any():
        return float("nan")
    return float(adjusted_rand_score(t[fg], p[fg]))


def full_ari(true: Any, pred: Any) -> float:
    """ARI over all pixels (background ids count as segments)."""
    return float(adjusted_rand_score(_flat(true), _flat(pred)))


def segmentation_covering(true: Any, pred: Any, background_ids: Sequence[int]) -> float:
    """Mean segmentation covering: the mean over true foreground segments of their best IoU with a predicted segment.

    Unweighted (each object counts once, as mSC in GENESIS); nan when the image has no foreground.
    scikit-learn has no covering metric, so it is computed here from the contingency table.
    """
    t, p = _flat(true), _flat(pred)
    ts = [v for v in np.unique(t) if v not in set(background_ids)]
    if not ts:
        return float("nan")
    _, p_inv = np.unique(p, return_inverse=True)
    p_area = np.bincount(p_inv)
    ious = []
    for v in ts:
        sel = t == v
        inter = np.bincount(p_inv[sel], minlength=p_area.size)  # overlap with each predicted segment
        ious.append(float((inter / (sel.sum() + p_area - inter)).max()))
    return float(np.mean(ious))


def mask_areas(pred: Any, num_decoders: int) -> np.ndarray:
    """Fraction of all pixels won by each decoder [K] (collapse: a few decoders take everything)."""
    counts = np.bincount(_flat(pred).astype(np.int64), minlength=num_decoders)[:num_decoders]
    return counts / max(counts.sum(), 1)


OBJECT_PIXEL_ROLES = ("own", "background", "other_object", "spare")


def object_pixel_roles(true: Any, pred: Any, background_ids: Sequence[int], num_decoders: int) -> np.ndarray:
    """Where one image's object pixels went, by the role of the decoder that won them: pixel counts [4] for
    OBJECT_PIXEL_ROLES.

    Every true region (each background id, each object) is owned by the decoder that won most of its pixels.
    An object pixel is "background" when its decoder owns a background region (an object left to the floor
    counts here, even if that decoder also owns the object), "own" when its decoder owns its object,
    "other_object" when the decoder owns another object (a merge, or bleeding across a border) and "spare" when
    the decoder owns no region (the object split with a decoder that holds nothing whole).
    """
    ids = [int(v) for v in np.unique(_flat(true))]
    won, _, _ = overlap_table(pred, true, num_decoders, ids)  # [K, regions] pixels of each region per decoder
    owner = won.argmax(axis=0)  # [regions]
    is_bg = np.isin(ids, list(background_ids))
    bg_dec = set(owner[is_bg].tolist())
    counts = np.zeros(len(OBJECT_PIXEL_ROLES), dtype=np.int64)
    objects = np.flatnonzero(~is_bg)
    for r in objects:
        others = {owner[o] for o in objects if o != r}  # decoders owning another object
        for j in np.flatnonzero(won[:, r]):
            role = 1 if j in bg_dec else 0 if j == owner[r] else 2 if j in others else 3
            counts[role] += int(won[j, r])
    return counts


def scene_metrics(true_masks: Any, pred: Any, background_ids: Sequence[Sequence[int]] | Sequence[int],
                  num_decoders: int) -> dict[str, Any]:
    """Per-image metrics averaged over a set of scene images.

    Args:
        true_masks: [N, *S] true id maps.
        pred: [N, *S] predicted segmentations (argmax decoder).
        background_ids: one list for all images, or one list per image.
        num_decoders: K.
    Returns:
        dict with fg_ari, full_ari, msc (means over images with foreground), per-image lists, mask_area [K],
        decoders_used (decoders winning at least 1% of the pixels) and object_pixels (the share of all object
        pixels by role, object_pixel_roles: where splits, merges and objects left to the background show).
    """
    n = len(true_masks)
    per_image = isinstance(background_ids[0], (list, tuple, np.ndarray)) if len(background_ids) else False
    fg, full, msc = [], [], []
    roles = np.zeros(len(OBJECT_PIXEL_ROLES), dtype=np.int64)
    for i in range(n):
        bg = background_ids[i] if per_image else background_ids
        fg.append(foreground_ari(true_masks[i], pred[i], bg))
        full.append(full_ari(true_masks[i], pred[i]))
        msc.append(segmentation_covering(true_masks[i], pred[i], bg))
        roles += object_pixel_roles(true_masks[i], pred[i], bg, num_decoders)
    area = mask_areas(pred, num_decoders)
    return {
        "images": n,
        "fg_ari": float(np.nanmean(fg)) if np.isfinite(fg).any() else float("nan"),
        "fg_ari_std": float(np.nanstd(fg)) if np.isfinite(fg).any() else float("nan"),
        "full_ari": float(np.mean(full)),
        "msc": float(np.nanmean(msc)) if np.isfinite(msc).any() else float("nan"),
        "mask_area": [round(float(a), 5) for a in area],
        "decoders_used": int((area >= 0.01).sum()),
        "object_pixels": {r: round(float(c / max(roles.sum(), 1)), 4) for r, c in zip(OBJECT_PIXEL_ROLES, roles,
                                                                                    strict=True)},
        "per_image": {"fg_ari": fg, "full_ari": full, "msc": msc},
    }


def overlap_table(pred: Any, true: Any, num_decoders: int,
                  classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contingency of every decoder's mask with every true class, in pixels (voxels): (intersections
    [K, len(classes)], decoder areas [K], class areas [len(classes)]), float64."""
    p = _flat(pred).astype(np.int64)
    t = _flat(true).astype(np.int64)
    size = max(int(t.max(initial=0)), max(classes)) + 1
    table = np.bincount(p * size + t, minlength=num_decoders * size)[: num_decoders * size]
    table = table.reshape(num_decoders, size)  # [K, true label] voxel counts
    inter = table[:, list(classes)].astype(np.float64)
    pred_area = np.bincount(p, minlength=num_decoders)[:num_decoders].astype(np.float64)
    true_area = np.array([(t == c).sum() for c in classes], dtype=np.float64)
    return inter, pred_area, true_area


def dice_matrix(pred: torch.Tensor, true: torch.Tensor, num_decoders: int, classes: Sequence[int]) -> np.ndarray:
    """Dice of every decoder's mask vs every true class, pooled over the whole set, [K, len(classes)].

    Computed from the contingency table (MONAI's Dice compares matched channels only, not all pairs).
    """
    inter, pred_area, true_area = overlap_table(pred, true, num_decoders, classes)
    denom = pred_area[:, None] + true_area[None, :]
    return np.where(denom > 0, 2 * inter / np.maximum(denom, 1), 0.0)


def tissue_dice(pred: torch.Tensor, tissue: torch.Tensor, num_decoders: int,
                tissues: dict[int, str] | None = None) -> dict[str, Any]:
    """Dice of decoders vs tissue classes after Hungarian matching (one decoder per tissue, max total Dice).

    Args:
        pred: [N, *S] argmax decoder per voxel.
        tissue: [N, *S] tissue labels (0 background, 1 CSF, 2 GM, 3 WM).
        num_decoders: K.
        tissues: label -> name of the classes to match (default CSF, GM, WM).
    Returns:
        dict with per-tissue Dice, mean Dice, the matching decoder -> tissue and the full Dice matrix.
    """
    tissues = tissues or TISSUES
    labels = list(tissues)
    dm = dice_matrix(pred, tissue, num_decoders, labels)  # [K, T]
    rows, cols = linear_sum_assignment(-dm)
    per = {tissues[labels[c]]: float(dm[r, c]) for r, c in zip(rows, cols, strict=True)}
    for name in tissues.values():
        per.setdefault(name, 0.0)  # fewer decoders than tissues: unmatched tissues score 0
    return {
        "dice": per,
        "mean_dice": float(np.mean(list(per.values()))),
        "matching": {f"decoder_{r}": tissues[labels[c]] for r, c in zip(rows, cols, strict=True)},
        "dice_matrix": [[round(float(v), 4) for v in row] for row in dm],
    }


def latent_probe(mu: np.ndarray, targets: np.ndarray, groups: Sequence[str], *, names: Sequence[str],
                 folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """Predict which shapes are present from the per-decoder latents, cross-validated by scene.

    One logistic regression per shape (multi-label), standardised, with GroupKFold over scene ids (frames of
    one scene never straddle train and test), on two views of the latents: "probe", the flattened means
    [N, K*L] in decoder order; "pooled", their per-dimension mean and max over the decoders [N, 2L], which is
    the same whichever decoder holds which object (decoders are exchangeable, and which one takes an object
    changes from scene to scene, so a fixed-order probe can miss what the latents carry). The baseline
    predicts each label's training-fold majority.

    Args:
        mu: [N, K, L] posterior means.
        targets: [N, T] multi-hot labels (e.g. sphere, box, cylinder present).
        groups: scene id per item.
        names: label names [T].
        folds: number of CV folds (reduced to the number of groups when fewer).
        seed: random state of the classifier.
    """
    mu = np.asarray(mu, dtype=np.float64)  # [N, K, L]
    views = {"probe": mu.reshape(len(mu), -1),  # [N, K*L]
             "pooled": np.concatenate([mu.mean(1), mu.max(1)], axis=1)}  # [N, 2L]
    y = np.asarray(targets, dtype=np.int64)
    groups = np.asarray(list(groups))
    k = min(folds, len(np.unique(groups)))
    if k < 2:
        return {"error": "need at least 2 scenes for a cross-validated probe"}
    cv = GroupKFold(n_splits=k)
    results: dict[str, Any] = {"folds": k, "items": int(len(y)), "labels": list(names)}
    preds = {"probe": np.zeros_like(y), "pooled": np.zeros_like(y), "baseline": np.zeros_like(y)}
    for j in range(y.shape[1]):
        for key in preds:
            x = views.get(key, views["probe"])
            if key in views:
                est = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, random_state=seed))
            else:
                est = DummyClassifier(strategy="most_frequent")
            try:
                preds[key][:, j] = cross_val_predict(est, x, y[:, j], cv=cv, groups=groups)
            except ValueError:  # a label constant within a training fold: fall back to the majority
                preds[key][:, j] = cross_val_predict(DummyClassifier(strategy="most_frequent"), x, y[:, j],
                                                     cv=cv, groups=groups)
    for key, pred in preds.items():
        results[key] = {
            "label_accuracy": {n: float((pred[:, j] == y[:, j]).mean()) for j, n in enumerate(names)},
            "mean_label_accuracy": float((pred == y).mean()),
            "exact_match": float((pred == y).all(axis=1).mean()),
            # balanced accuracy: 0.5 for any constant guess, so chance is the same for every label
            "mean_balanced_accuracy": float(np.mean([balanced_accuracy_score(y[:, j], pred[:, j])
                                                     for j in range(y.shape[1])])),
        }
    results["positive_rate"] = {n: float(y[:, j].mean()) for j, n in enumerate(names)}
    return results


def match_objects(true: np.ndarray, pred: np.ndarray, object_ids: Sequence[int], k: int) -> dict[int, int]:
    """One decoder per object by Hungarian matching on IoU (an object whose decoder has no pixel of it stays
    unmatched): true [*S] ids, pred [*S] decoder index, object_ids the ids to match -> {object id: decoder}."""
    ids = list(object_ids)
    if not ids:
        return {}
    inter, pred_area, true_area = overlap_table(pred, true, k, ids)
    inter = inter.T  # [objects, K]
    iou = inter / np.maximum(true_area[:, None] + pred_area[None, :] - inter, 1)
    rows, cols = linear_sum_assignment(-iou)
    return {ids[r]: int(c) for r, c in zip(rows, cols, strict=True) if inter[r, c] > 0}


def object_probe(mu: np.ndarray, pred: np.ndarray, masks: np.ndarray, objects: Sequence[Sequence[dict[str, Any]]],
                 groups: Sequence[str], *, names: Sequence[str], folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """Predict each object's shape from the latent of the decoder that took it, cross-validated by scene.

    The property-prediction protocol of object-centric models (IODINE, Slot Attention): every visible object
    is matched to one decoder (Hungarian, IoU of its pixels with the decoder's argmax region) and a standardised
    logistic regression maps that decoder's posterior mean to the object's shape (GroupKFold over scene ids).
    Unlike `latent_probe`, which must find the shapes among K exchangeable latents, this asks whether the
    latent of the decoder holding an object says what the object is.

    Args:
        mu: [N, K, L] posterior means.
        pred: [N, *S] decoder index per pixel.
        masks: [N, *S] true ids.
        objects: per item, dicts with "id", "shape" and "visible_pixels".
        groups: scene id per item.
        names: the shape names (classes).
        folds: CV folds (fewer when there are fewer scenes).
        seed: random state of the classifier.
    Returns:
        {"objects", "matched" (fraction of visible objects given a decoder), "balanced_accuracy" (chance
        1 / len(names)), "one_vs_rest_balanced_accuracy" (mean over shapes of "is it this shape?", chance 0.5),
        "baseline" (the training folds' majority), "per_shape" recall, "folds"}.
    """
    mu = np.asarray(mu, dtype=np.float64)
    rows, labels, scene, visible = [], [], [], 0
    for i, objs in enumerate(objects):
        ids = [int(o["id"]) for o in objs if int(o.get("visible_pixels", 1)) > 0]
        visible += len(ids)
        match = match_objects(masks[i], pred[i], ids, mu.shape[1])
        for o in objs:
            if int(o["id"]) in match:
                rows.append(mu[i, match[int(o["id"])]])
                labels.append(list(names).index(o["shape"]))
                scene.append(groups[i])
    out: dict[str, Any] = {"objects": len(labels), "matched": len(labels) / visible if visible else float("nan"),
                           "labels": list(names)}
    y, g = np.asarray(labels, dtype=np.int64), np.asarray(scene)
    k = min(folds, len(np.unique(g))) if len(g) else 0
    if k < 2 or len(np.unique(y)) < 2:
        out["error"] = "need matched objects of at least 2 shapes in at least 2 scenes"
        return out
    cv = GroupKFold(n_splits=k)
    x = np.stack(rows)
    est = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, random_state=seed))
    try:
        pred_y = cross_val_predict(est, x, y, cv=cv, groups=g)
    except ValueError:  # a training fold holds one shape only (tiny test sets)
        out["error"] = "a training fold holds objects of one shape only"
        return out
    base_y = cross_val_predict(DummyClassifier(strategy="most_frequent"), x, y, cv=cv, groups=g)
    present = [j for j in range(len(names)) if np.any(y == j)]
    out.update({
        "folds": k,
        "balanced_accuracy": float(balanced_accuracy_score(y, pred_y)),
        "one_vs_rest_balanced_accuracy": float(np.mean([balanced_accuracy_score(y == j, pred_y == j) for j in present])),
        "baseline": float(balanced_accuracy_score(y, base_y)),
        "per_shape": {names[j]: float(np.mean(pred_y[y == j] == j)) for j in present},
    })
    return out


COLOUR_BASELINES = ("kmeans", "gmm")


def colour_clusters(images: Any, k: int, method: str = "kmeans", seed: int = 0, max_fit: int = 4096) -> np.ndarray:
    """The baselines every segmentation report shows beside the model: per image, cluster the pixel (voxel)
    colours into k groups with k-means or a Gaussian mixture (fitted on at most `max_fit` pixels).

    Args:
        images: [N, C, *S] images.
        k: number of groups (the model's number of decoders).
        method: "kmeans" or "gmm".
        seed: random state of the fits and the pixel subsample.
    Returns:
        [N, *S] int64 group ids, numbered by ascending mean colour (channel mean) in every image, so that
        an id means the same across images (tissue Dice pools the set under one matching; ARI is unaffected).
    """
    if method not in COLOUR_BASELINES:
        raise ValueError(f"unknown colour baseline {method!r} (one of {', '.join(COLOUR_BASELINES)})")
    x = np.asarray(images, dtype=np.float64)
    n, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
    out = np.zeros((n, *spatial), dtype=np.int64)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pix = x[i].reshape(c, -1).T  # [P, C]
        fit = pix[rng.choice(len(pix), max_fit, replace=False)] if len(pix) > max_fit else pix
        kk = max(1, min(k, len(np.unique(fit, axis=0))))  # a flat image has fewer colours than groups
        if method == "kmeans":
            est = KMeans(n_clusters=kk, n_init=3, random_state=seed)
        else:
            est = GaussianMixture(n_components=kk, covariance_type="full", reg_covar=1e-4, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence warnings on near-flat images
            est.fit(fit)
            groups = est.predict(pix)
        centres = est.cluster_centers_ if method == "kmeans" else est.means_  # [kk, C]
        rank = np.argsort(np.argsort(centres.mean(axis=1)))  # cluster -> its place by brightness
        out[i] = rank[groups].reshape(spatial)
    return out
