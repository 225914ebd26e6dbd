"""The synthesize pipeline: a checkpoint -> a BIDS-derivative folder of NIfTI volumes, or an on-the-fly Dataset.

The folder (DESIGN.md section 4) is read by a plain MONAI pipeline with no medgen code:

    OUT/dataset_description.json  participants.tsv  datalist.json
    OUT/sub-synth0001/anat/sub-synth0001_desc-<model>_T1w.nii.gz (+ .json sidecar)
    OUT/montage.png  (the first MONTAGE_PER_CLASS volumes written of each class)

Noise is drawn on the CPU from a seeded generator, so the same seed gives the same volumes on any device.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

import medgen
from medgen.checkpoint import model_from_checkpoint
from medgen.errors import MedgenError
from medgen.models.sampling import decode, draw_latents, sample_images
from medgen.outputs import atomic_write_json, atomic_write_text, check_output_dir, staged_dir
from medgen.runtime import resolve_device
from medgen.viz import save_montage

MONTAGE_PER_CLASS = 2


def class_indices(classes: Sequence[str] | None, class_names: Sequence[str], where: str = "checkpoint") -> list[int]:
    """Map class names to indices (None -> all classes); an unknown name is a clear error."""
    if not classes:
        return list(range(len(class_names)))
    out = []
    for name in classes:
        if name not in class_names:
            raise MedgenError(f"unknown class {name!r}; the {where} has classes: {', '.join(class_names)}")
        out.append(list(class_names).index(name))
    return out


def split_labels(n: int, classes: Sequence[int]) -> list[int]:
    """n labels split evenly across `classes` (the first classes get the remainder), grouped by class."""
    if n < 1:
        raise MedgenError(f"--n must be at least 1, got {n}")
    k = len(classes)
    counts = [n // k + (1 if i < n % k else 0) for i in range(k)]
    return [c for c, m in zip(classes, counts, strict=True) for _ in range(m)]


def _bids_label(name: str) -> str:
    """BIDS entity values are alphanumeric: alpha-gan -> alphagan."""
    return re.sub(r"[^A-Za-z0-9]", "", name) or "model"


def write_synthetic(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    n: int,
    classes: Sequence[str] | None = None,
    seed: int = 0,
    overwrite: bool = False,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    ema: bool = True,
) -> Path:
    """Sample `n` volumes from a checkpoint and write the BIDS-derivative folder atomically.

    Args:
        checkpoint: a checkpoint file or a run folder.
        out: the output folder (refused when non-empty unless overwrite).
        n: number of volumes, split evenly across `classes`.
        classes: class names to sample (default: all the checkpoint's classes).
        seed: seed of the latents (same seed, same volumes).
        overwrite: replace an existing folder once the new one is complete.
        batch_size: volumes decoded per forward pass.
        device: where the generator runs.
        ema: sample from the EMA weights when present.
    Returns:
        The output folder.
    """
    check_output_dir(out, overwrite=overwrite, inputs=[checkpoint])
    model, meta = model_from_checkpoint(checkpoint, ema=ema)
    class_names = meta["class_names"]
    affine = meta["affine"]
    if affine is None:
        raise MedgenError(f"checkpoint {meta['path']} has no training affine (a 2D model); synth writes 3D NIfTI volumes")
    labels = split_labels(n, class_indices(classes, class_names))
    dev = resolve_device(device) if isinstance(device, str) else device
    batch_size = max(1, int(batch_size))
    z = draw_latents(len(labels), model.latent_dim, seed)  # [N, latent_dim], same stream as sample_images
    probe = decode(model, z[:1], labels[:1], device=dev)
    if probe.ndim != 5:
        raise MedgenError(f"checkpoint {meta['path']} produces {probe.ndim - 2}D images; synth writes 3D volumes")
    desc = _bids_label(meta["model"])
    ckpt_name = Path(meta["path"]).name
    with staged_dir(out, overwrite=overwrite, inputs=[checkpoint], command="synth") as tmp:
        atomic_write_json(tmp / "dataset_description.json", {
            "Name": f"medgen synthetic {meta['model']} volumes",
            "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": [{
                "Name": "medgen",
                "Version": medgen.__version__,
                "Description": f"sampled from {meta['model']} checkpoint {ckpt_name} (sha256 {meta['sha256']}), seed {seed}",
            }],
            "Checkpoint": {"file": ckpt_name, "sha256": meta["sha256"], "model": meta["model"], "step": meta["step"]},
            "Intensity": "model output in [-1, 1] (training normalisation)",
        })
        rows = ["participant_id\tgroup\tlabel"]
        training = []
        shown: list[tuple[torch.Tensor, int]] = []  # the montage's volumes
        for i, label in enumerate(labels):
            if i % batch_size == 0:  # decode the next chunk only when needed (bounded memory)
                chunk = decode(model, z[i : i + batch_size], labels[i : i + batch_size], batch_size=batch_size,
                               device=dev)
            vol = chunk[i % batch_size]
            if not bool(torch.isfinite(vol).all()) or float(vol.max() - vol.min()) == 0.0:
                raise MedgenError(f"checkpoint {meta['path']} produced a {'NaN' if not torch.isfinite(vol).all() else 'constant'} "
                                  f"volume for class {class_names[label]} (index {i}); nothing was written")
            sub = f"sub-synth{i + 1:04d}"
            rel = f"{sub}/anat/{sub}_desc-{desc}_T1w.nii.gz"
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            img = nib.Nifti1Image(vol[0].numpy().astype(np.float32), affine)  # [D, H, W] voxel axes of the affine
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=1)
            nib.save(img, str(path))
            atomic_write_json(path.with_name(path.name.replace(".nii.gz", ".json")), {
                "seed": seed, "index": i, "class": class_names[label], "label": int(label),
                "model": meta["model"], "checkpoint": ckpt_name, "checkpoint_sha256": meta["sha256"],
            })
            rows.append(f"{sub}\t{class_names[label]}\t{label}")
            if sum(k == label for _, k in shown) < MONTAGE_PER_CLASS:
                shown.append((vol.clone(), int(label)))
            training.append({"image": rel, "label": int(label), "subject": sub})
        atomic_write_text(tmp / "participants.tsv", "\n".join(rows) + "\n")
        save_montage(torch.stack([v for v, _ in shown]), [k for _, k in shown], class_names, tmp / "montage.png",
                     title=f"medgen synth: {meta['model']} {ckpt_name}, seed {seed} (first volumes of each class)")
        atomic_write_json(tmp / "datalist.json", {
            "name": "medgen-synthetic",
            "description": f"{meta['model']} samples, seed {seed}",
            "labels": {str(i): c for i, c in enumerate(class_names)},
            "numTraining": len(training),
            "training": training,
        })
    return Path(out)


class SyntheticDataset(torch.utils.data.Dataset):
    """Samples volumes from a checkpoint on the fly: item i is {"image": Tensor[C, *spatial], "label": int}.

    Item i's latent comes from a generator seeded with (seed, i), so items are reproducible in any order
    and with any number of DataLoader workers.

    Args:
        checkpoint: a checkpoint file or run folder.
        n: number of items, split evenly across `classes`.
        classes: class names (default: all).
        seed: base seed.
        device: where the generator runs.
        ema: use the EMA weights when present.
    """

    def __init__(self, checkpoint: str | os.PathLike, n: int, classes: Sequence[str] | None = None,
                 seed: int = 0, device: str = "cpu", ema: bool = True) -> None:
        self.model, self.meta = model_from_checkpoint(checkpoint, ema=ema)
        self.class_names = self.meta["class_names"]
        self.labels = split_labels(n, class_indices(classes, self.class_names))
        self.seed = int(seed)
        self.device = device

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        label = self.labels[i]
        item_seed = (self.seed * 1_000_003 + i) % (2**63)
        image = sample_images(self.model, [label], seed=item_seed, batch_size=1, device=self.device)[0]
        return {"image": image, "label": label}
