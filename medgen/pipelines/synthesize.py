"""The synthesize pipeline: a checkpoint -> a BIDS-derivative folder of NIfTI volumes, or an on-the-fly Dataset.

The folder (DESIGN.md section 4) is a valid BIDS derivative dataset that a plain MONAI pipeline reads
with no medgen code:

    OUT/dataset_description.json  participants.tsv  participants.json  README  datalist.json  .bidsignore
    OUT/sub-synth0001/anat/sub-synth0001_desc-<model>_T1w.nii.gz (+ .json sidecar)
    OUT/montage.png  (the first MONTAGE_PER_CLASS volumes written of each class)

Volumes are written in the training data's intensity scale (the recorded percentile normalisation
inverted; `scale="model"` keeps the model's [-1, 1]) with the training affine and the training data's
NIfTI sform/qform codes and units. Noise is drawn on the CPU from a seeded generator, so the same seed
gives the same volumes on any device.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.context
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from medgen.bids import write_bidsignore, write_dataset_description, write_participants, write_readme
from medgen.checkpoint import model_from_checkpoint
from medgen.console import log
from medgen.errors import MedgenError
from medgen.models.sampling import decode, draw_latents, prior_codes, sample_images
from medgen.outputs import atomic_write_json, check_output_dir, staged_dir
from medgen.runtime import resolve_device
from medgen.viz import save_montage

MONTAGE_PER_CLASS = 2

Scale = Literal["data", "model"]
SCALES = ("data", "model")
# NIfTI codes of checkpoints that predate the recorded header: scanner space, mm and seconds.
DEFAULT_NIFTI = {"sform_code": 1, "qform_code": 1, "xyzt_units": 10}


def intensity_map(normalisation: dict[str, Any], scale: str) -> tuple[float, float] | None:
    """(low, high) that the model's -1 and 1 map to for `scale`, or None to keep [-1, 1].

    "data" inverts the recorded percentile scaling with the training set's median percentiles
    ("source_range"); a checkpoint without that record (older medgen) falls back to the model scale.
    """
    if scale not in SCALES:
        raise MedgenError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if scale == "model":
        return None
    rng = normalisation.get("source_range")
    if not rng or len(rng) != 2 or not float(rng[1]) > float(rng[0]):
        return None
    return float(rng[0]), float(rng[1])


def to_scale(x: torch.Tensor, mapping: tuple[float, float] | None) -> torch.Tensor:
    """Model output in [-1, 1] -> the data scale (`mapping` = the values of -1 and 1; None: unchanged)."""
    if mapping is None:
        return x
    low, high = mapping
    return low + (x + 1.0) * (0.5 * (high - low))


def nifti_codes(normalisation: dict[str, Any]) -> dict[str, int]:
    """sform_code, qform_code, xyzt_units that volumes in the training space carry (the training data's)."""
    rec = normalisation.get("nifti") or {}
    out = dict(DEFAULT_NIFTI)
    out.update({k: int(v) for k, v in rec.items() if k in DEFAULT_NIFTI})
    if out["xyzt_units"] & 0x07 == 0:  # no spatial unit recorded: the affine is in mm
        out["xyzt_units"] |= 2
    return out


def nifti_volume(vol: np.ndarray, affine: np.ndarray, codes: dict[str, int]) -> nib.Nifti1Image:
    """A float32 NIfTI-1 image with the training affine, sform/qform codes and xyzt units."""
    img = nib.Nifti1Image(np.asarray(vol, dtype=np.float32), affine)  # [D, H, W] voxel axes of the affine
    img.set_qform(affine, code=int(codes["qform_code"]))
    img.set_sform(affine, code=int(codes["sform_code"]))
    img.header["xyzt_units"] = int(codes["xyzt_units"])
    return img


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
    scale: Scale = "data",
    skull_stripped: bool | None = None,
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
        scale: "data" writes the training data's intensity scale (the recorded normalisation inverted),
            "model" the model's [-1, 1].
        skull_stripped: the sidecars' SkullStripped (BIDS requires it for anatomical derivatives);
            default: true when the generator was trained on the (brain-extracted) phantom, else false.
    Returns:
        The output folder.
    """
    if scale not in SCALES:
        raise MedgenError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    check_output_dir(out, overwrite=overwrite, inputs=[checkpoint])
    model, meta = model_from_checkpoint(checkpoint, ema=ema)
    class_names = meta["class_names"]
    affine = meta["affine"]
    if affine is None:
        raise MedgenError(f"checkpoint {meta['path']} has no training affine (a 2D model); synth writes 3D NIfTI volumes")
    labels = split_labels(n, class_indices(classes, class_names))
    dev = resolve_device(device) if isinstance(device, str) else device
    batch_size = max(1, int(batch_size))
    z = prior_codes(model, draw_latents(len(labels), model.latent_dim, seed), labels)  # [N, L], as sample_images
    probe = decode(model, z[:1], labels[:1], device=dev)
    if probe.ndim != 5:
        raise MedgenError(f"checkpoint {meta['path']} produces {probe.ndim - 2}D images; synth writes 3D volumes")
    norm = meta["normalisation"]
    mapping = intensity_map(norm, scale)
    if scale == "data" and mapping is None:
        log(f"checkpoint {meta['path']} records no intensity scale of its training data (older medgen); "
            "writing the model scale [-1, 1]")
    intensity = (f"training data scale: the model's [-1, 1] mapped to [{mapping[0]:.6g}, {mapping[1]:.6g}], the "
                 "median 0.5 and 99.5 percentiles of the training volumes" if mapping is not None else
                 "model output in [-1, 1] (training normalisation)")
    codes = nifti_codes(norm)
    source = norm.get("source_dataset") or {}
    if skull_stripped is None:
        skull_stripped = bool(source.get("phantom", False))
    desc = _bids_label(meta["model"])
    ckpt_name = Path(meta["path"]).name
    with staged_dir(out, overwrite=overwrite, inputs=[checkpoint], command="synth") as tmp:
        write_dataset_description(
            tmp, f"medgen synthetic {meta['model']} volumes", dataset_type="derivative",
            generated=f"sampled from {meta['model']} checkpoint {ckpt_name} (sha256 {meta['sha256']}), seed {seed}",
            source_datasets=[{"URL": source["uri"]}] if source.get("uri") else (),
            Checkpoint={"file": ckpt_name, "sha256": meta["sha256"], "model": meta["model"], "step": meta["step"]},
            Intensity=intensity,
        )
        rows = []
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
            nib.save(nifti_volume(to_scale(vol[0], mapping).numpy(), affine, codes), str(path))
            atomic_write_json(path.with_name(path.name.replace(".nii.gz", ".json")), {
                "SkullStripped": bool(skull_stripped),
                "Description": f"synthetic {class_names[label]} volume from {meta['model']}",
                "seed": seed, "index": i, "class": class_names[label], "label": int(label),
                "model": meta["model"], "checkpoint": ckpt_name, "checkpoint_sha256": meta["sha256"],
                "intensity_scale": "data" if mapping is not None else "model",
            })
            rows.append({"participant_id": sub, "group": class_names[label], "label": int(label)})
            if sum(k == label for _, k in shown) < MONTAGE_PER_CLASS:
                shown.append((vol.clone(), int(label)))
            training.append({"image": rel, "label": int(label), "subject": sub})
        write_participants(tmp, rows, {
            "group": {"Description": "class the volume was sampled for", "Levels": {c: c for c in class_names}},
            "label": "class index (datalist.json labels)",
        })
        save_montage(torch.stack([v for v, _ in shown]), [k for _, k in shown], class_names, tmp / "montage.png",
                     title=f"medgen synth: {meta['model']} {ckpt_name}, seed {seed} (first volumes of each class)")
        atomic_write_json(tmp / "datalist.json", {
            "name": "medgen-synthetic",
            "description": f"{meta['model']} samples, seed {seed}",
            "labels": {str(i): c for i, c in enumerate(class_names)},
            "numTraining": len(training),
            "training": training,
        })
        write_bidsignore(tmp, ["datalist.json", "montage.png"])
        write_readme(tmp, f"""\
Synthetic T1-weighted volumes sampled by medgen from a {meta['model']} generator (checkpoint {ckpt_name},
sha256 {meta['sha256']}, seed {seed}); not real subjects. Each sub-synthNNNN is one sampled volume; its
class is the participants.tsv group. Intensity: {intensity}.
datalist.json lists the volumes for MONAI (image, label, subject).""")
    return Path(out)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The latent seed of item `index` in `epoch`: independent streams for every (seed, epoch, index)."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1, np.uint64)[0] >> 1)


class SyntheticDataset(torch.utils.data.Dataset):
    """Samples volumes from a checkpoint on the fly: item i is {"image": MetaTensor[C, *spatial], "label": int}.

    Images carry the training affine (MONAI's Orientationd, SaveImaged and friends read it) and are in the
    training data's intensity scale (`scale="data"`, as `medgen synth` writes) or the model's [-1, 1].
    Item i's latent comes from a generator seeded with (seed, epoch, i): reproducible in any order and with
    any number of DataLoader workers (each item is its own stream, so workers never repeat each other).
    Call `set_epoch(e)` before each epoch for fresh volumes (as with DistributedSampler); the epoch is
    shared memory, so persistent workers see it too.

    Args:
        checkpoint: a checkpoint file or run folder.
        n: number of items, split evenly across `classes`.
        classes: class names (default: all).
        seed: base seed.
        device: where the generator runs.
        ema: use the EMA weights when present.
        scale: "data" (the training data's intensity scale) or "model" ([-1, 1]).
    """

    def __init__(self, checkpoint: str | os.PathLike, n: int, classes: Sequence[str] | None = None,
                 seed: int = 0, device: str = "cpu", ema: bool = True, scale: Scale = "data") -> None:
        self.model, self.meta = model_from_checkpoint(checkpoint, ema=ema)
        self.class_names = self.meta["class_names"]
        self.labels = split_labels(n, class_indices(classes, self.class_names))
        self.seed = int(seed)
        self.device = device
        self.mapping = intensity_map(self.meta["normalisation"], scale)
        aff = self.meta["affine"]
        self.affine = None if aff is None else torch.as_tensor(aff, dtype=torch.float64)
        self._epoch = mp.RawValue("q", 0)

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def set_epoch(self, epoch: int) -> None:
        """Draw the volumes of `epoch` from now on (visible to DataLoader workers, persistent ones too)."""
        self._epoch.value = int(epoch)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if multiprocessing.context.get_spawning_popen() is None:  # plain pickle/copy: no memory to share
            state["_epoch"] = self.epoch
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["_epoch"], int):
            state["_epoch"] = mp.RawValue("q", state["_epoch"])
        self.__dict__.update(state)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        label = self.labels[i]
        seed = item_seed(self.seed, self.epoch, i)
        image = to_scale(sample_images(self.model, [label], seed=seed, batch_size=1, device=self.device)[0],
                         self.mapping)
        meta = {"filename_or_obj": f"synthetic-{self.epoch}-{i}", "seed": seed}
        if self.affine is None:
            return {"image": image, "label": label}
        return {"image": MetaTensor(image, affine=self.affine.clone(), meta=meta), "label": label}
