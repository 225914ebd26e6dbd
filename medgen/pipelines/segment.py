"""`medgen segment`: run a trained parallel-decoder VAE on data, write segmentations, pictures and metrics.

Output folder (written atomically):
    metrics.json        FG-ARI / full ARI / mSC / per-decoder mask area (scenes), tissue Dice (volumes),
                        latent probe vs baseline (scenes), the same scores of k-means / GMM on pixel colour
                        (baselines), and "comparison": the model's headline scores beside the baselines
    index.html          the run's page (medgen.pipelines.site)
    per_image.csv       per-image metrics
    segmentations/      2D: <name>.png overlay + <name>_labels.png (decoder ids); 3D: <name>_seg.nii.gz
    panels/<name>.png   input, reconstruction, argmax segmentation, truth, per-decoder images and weights
    traversal.png       one row per decoder: vary its most used latent dimension, decode
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from medgen.checkpoint import model_from_checkpoint
from medgen.console import log
from medgen.data import load_dataset
from medgen.data.dataset import ImageSet
from medgen.data.scenes import BACKGROUND, FIRST_OBJECT_ID, SHAPES, is_scene_folder, load_scene_dataset
from medgen.errors import MedgenError
from medgen.evaluation.segmentation import (
    COLOUR_BASELINES,
    TISSUES,
    argmax_segmentation,
    colour_clusters,
    latent_probe,
    object_probe,
    scene_metrics,
    tissue_dice,
)
from medgen.outputs import check_output_dir, staged_dir
from medgen.pipelines.site import write_page_safely
from medgen.runtime import resolve_device
from medgen.viz import palette, save_png, to_uint8, write_panel, write_traversal


def load_segment_data(spec: str | Path, image_size: int) -> ImageSet:
    """Read a scenes folder or any dataset medgen.data.load_dataset understands (volumes at `image_size`)."""
    if is_scene_folder(spec):
        return load_scene_dataset(spec)
    return load_dataset(spec, size=image_size)


@torch.no_grad()
def run_model(model: torch.nn.Module, images: torch.Tensor, *, batch_size: int = 16,
              device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Mean-latent pass over all images: argmax segmentation [N, *S], mu [N, K, L], soft areas [N, K]."""
    model.eval().to(device)
    preds, mus, soft = [], [], []
    for i in range(0, len(images), batch_size):
        out = model(images[i : i + batch_size].to(device))
        preds.append(argmax_segmentation(out.weights).cpu())
        mus.append(out.mu.float().cpu())
        soft.append(out.weights.float().flatten(2).mean(dim=2).cpu())  # [B, K, 1*prod(S)] -> [B, K]
    return {"pred": torch.cat(preds), "mu": torch.cat(mus), "soft_area": torch.cat(soft)}


def comparison(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The model's headline scores beside each baseline's on the same images: {method: {score: value}}.

    Scenes: fg_ari, full_ari, msc; volumes: Dice per tissue and mean Dice.
    """
    def scores(m: dict[str, Any]) -> dict[str, float]:
        if "scenes" in m:
            return {key: round(float(m["scenes"][key]), 4) for key in ("fg_ari", "full_ari", "msc")}
        if "tissue" in m:
            return {**{f"dice_{t}": round(float(v), 4) for t, v in m["tissue"]["dice"].items()},
                    "mean_dice": round(float(m["tissue"]["mean_dice"]), 4)}
        return {}

    table = {"model": scores(metrics)}
    for method, m in metrics.get("baselines", {}).items():
        table[method] = scores(m)
    return {key: value for key, value in table.items() if value}


def segment(checkpoint: str | Path, data: str | Path | ImageSet, out: str | Path, *, n: int | None = None, panels: int = 16,
            batch_size: int = 16, device: str = "auto", seed: int = 0, overwrite: bool = False,
            colour_baselines: bool = True) -> dict[str, Any]:
    """Segment a dataset with a trained parallel-decoder VAE and write the results folder.

    Args:
        checkpoint: checkpoint file or run folder of a `parallel-vae` model.
        data: a `medgen scenes` folder, volume data (phantom folder, datalist, table) or an ImageSet.
        out: output folder (refused if it exists, unless overwrite).
        n: use the first n images only (all when None).
        panels: number of per-sample picture panels (first items).
        batch_size: inference batch size.
        device: auto | cpu | cuda.
        seed: random state of the latent probe.
        overwrite: replace an existing output folder.
        colour_baselines: also score k-means and a Gaussian mixture on pixel colour (metrics["baselines"]).
    Returns:
        The metrics dict (also written to metrics.json).
    """
    inputs = [checkpoint, None if isinstance(data, ImageSet) else data]
    check_output_dir(out, overwrite=overwrite, inputs=inputs)
    model, meta = model_from_checkpoint(checkpoint, expected_model="parallel-vae")
    kw = meta["kwargs"]
    if not isinstance(data, ImageSet):
        scenes, dims = is_scene_folder(data), int(kw.get("spatial_dims", model.spatial_dims))
        if scenes != (dims == 2):
            have = "2D scenes (a `medgen scenes` folder)" if scenes else "3D volumes"
            raise MedgenError(f"{data}: holds {have}, but the checkpoint {meta['path']} is a {dims}D parallel-vae; "
                              f"use a {'2D' if scenes else '3D'} checkpoint (medgen train parallel-vae --data {data})")
    ds = data if isinstance(data, ImageSet) else load_segment_data(data, int(kw.get("image_size", 64)))
    if n is not None:
        if n < 1:
            raise MedgenError(f"--n must be at least 1, got {n}")
        ds = ds.subset(list(range(min(n, len(ds)))))
    expected = (model.in_channels,) + (model.image_size,) * model.spatial_dims
    if tuple(ds.images.shape[1:]) != expected:
        raise MedgenError(f"{data}: images have shape {tuple(ds.images.shape[1:])} but the checkpoint "
                          f"{meta['path']} expects {expected}")
    dev = resolve_device(device)
    k = model.num_decoders
    log(f"segmenting {len(ds)} images with K={k} decoders")
    res = run_model(model, ds.images, batch_size=batch_size, device=dev)
    model.to("cpu")
    pred, mu = res["pred"], res["mu"]
    names = [Path(s).name.split(".")[0] for s in ds.sources] if ds.sources else [f"item-{i:05d}" for i in range(len(ds))]
    metrics: dict[str, Any] = {
        "checkpoint": str(meta["path"]), "data": "ImageSet" if isinstance(data, ImageSet) else str(data),
        "images": len(ds), "num_decoders": k,
        "latent_dim_per_decoder": model.latent_per_decoder, "checkpoint_step": meta.get("step"),
        "soft_area": [round(float(v), 5) for v in res["soft_area"].mean(dim=0)],
    }
    per_image: dict[str, list[float]] = {}
    if "masks" in ds.extras:
        sm = scene_metrics(ds.extras["masks"].numpy(), pred.numpy(), ds.extras["background_ids"], k)
        per_image = sm.pop("per_image")
        metrics["scenes"] = sm
        if "shapes_present" in ds.extras:
            metrics["probe"] = latent_probe(mu.numpy(), ds.extras["shapes_present"].numpy(), ds.subjects,
                                            names=SHAPES, seed=seed)
        if "objects" in ds.extras:
            metrics["object_probe"] = object_probe(mu.numpy(), pred.numpy(), ds.extras["masks"].numpy(),
                                                   ds.extras["objects"], ds.subjects, names=SHAPES, seed=seed)
    if "tissue" in ds.extras:
        metrics["tissue"] = tissue_dice(pred, ds.extras["tissue"].reshape(pred.shape), k)
    baselines: dict[str, Any] = {}
    for method in COLOUR_BASELINES if ("masks" in ds.extras or "tissue" in ds.extras) and colour_baselines else ():
        log(f"baseline: {method} on pixel colour, K={k}")
        base = colour_clusters(ds.images.numpy(), k, method=method, seed=seed)
        if "masks" in ds.extras:
            sm = scene_metrics(ds.extras["masks"].numpy(), base, ds.extras["background_ids"], k)
            sm.pop("per_image")
            baselines[method] = {"scenes": sm}
        else:
            baselines[method] = {"tissue": tissue_dice(torch.as_tensor(base), ds.extras["tissue"].reshape(pred.shape), k)}
    if baselines:
        metrics["baselines"] = baselines
    metrics["comparison"] = comparison(metrics)
    truth = ds.extras.get("masks")
    if truth is None and "tissue" in ds.extras:
        truth = ds.extras["tissue"].reshape(pred.shape)

    with staged_dir(out, overwrite=overwrite, inputs=inputs, command="segment") as tmp:
        seg_dir = tmp / "segmentations"
        seg_dir.mkdir()
        pal = palette(max(k, 10))
        affine = meta.get("affine")
        affine = ds.affine if affine is None else np.asarray(affine, dtype=np.float64)
        for i, name in enumerate(names):
            if model.spatial_dims == 2:
                img = to_uint8(ds.images[i]).astype(np.float32)
                overlay = (0.5 * img + 0.5 * pal[pred[i].numpy()]).astype(np.uint8)
                save_png(seg_dir / f"{name}.png", overlay)
                save_png(seg_dir / f"{name}_labels.png", pred[i].numpy().astype(np.uint8))
            else:
                nib.save(nib.Nifti1Image(pred[i].numpy().astype(np.uint8), affine if affine is not None else np.eye(4)),
                         str(seg_dir / f"{name}_seg.nii.gz"))
        truth_names = None
        if "masks" in ds.extras:
            truth_names = {**BACKGROUND, **{FIRST_OBJECT_ID + j: f"object {j + 1}" for j in range(32)}}
        elif "tissue" in ds.extras:
            truth_names = {0: "background", **TISSUES}
        for i in range(min(panels, len(ds))):
            write_panel(tmp / "panels" / f"{names[i]}.png", model, ds.images[i],
                        None if truth is None else truth[i], truth_names=truth_names, title=names[i])
        metrics["traversal_dims"] = write_traversal(tmp / "traversal.png", model, mu)
        with open(tmp / "per_image.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["name", "subject", *per_image])
            for i, name in enumerate(names):
                w.writerow([name, ds.subjects[i], *(round(v[i], 5) for v in per_image.values())])
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        write_page_safely(tmp, "segment", name=Path(out).name)  # OUT/index.html
    return metrics
