"""What the autoencoder commands (traverse, anomaly, denoise) share: the model, its data, who trained it, and
volumes written with the training geometry and intensity scale (as `medgen synth` writes them)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from medgen.checkpoint import model_from_checkpoint
from medgen.config import config_from_dict
from medgen.data import load_config_data, load_dataset
from medgen.data.dataset import ImageSet
from medgen.errors import MedgenError
from medgen.models.sampling import can_encode
from medgen.pipelines.synthesize import intensity_map, nifti_codes, nifti_volume, to_scale

AUTOENCODERS = ("vae", "alpha-gan")


def load_autoencoder(checkpoint: str | os.PathLike, ema: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """A 3D vae or alpha-gan from a checkpoint or run folder (eval mode, CPU), with its meta."""
    model, meta = model_from_checkpoint(checkpoint, ema=ema)
    if meta["model"] not in AUTOENCODERS or not can_encode(model):
        raise MedgenError(f"checkpoint {meta['path']} is a {meta['model']} model; this command needs an autoencoder "
                          f"({' or '.join(AUTOENCODERS)}: an encoder and a decoder)")
    if getattr(model, "spatial_dims", 3) != 3 or meta["affine"] is None:
        raise MedgenError(f"checkpoint {meta['path']} is a 2D model; this command works on 3D volumes")
    return model, meta


def checkpoint_data(meta: dict[str, Any], data: str | os.PathLike | ImageSet | None) -> ImageSet:
    """The volumes to work on, on the checkpoint's grid and in its class order: `data` (a dataset spec or an
    ImageSet), or, when None, the data the run trained on (its config's data.path or built-in phantom)."""
    size = int(meta["kwargs"].get("image_size", 64))
    if isinstance(data, ImageSet):
        ds = data
    elif data is None:
        try:
            cfg = config_from_dict(dict(meta.get("config") or {}), source=f"checkpoint {meta['path']} config")
        except MedgenError as e:
            raise MedgenError(f"{e}; give --data") from None
        ds = load_config_data(cfg, class_names=meta["class_names"], size=size)
    else:
        ds = load_dataset(data, size=size, class_names=meta["class_names"])
    expected = (int(meta["kwargs"].get("in_channels", 1)),) + (size,) * 3
    if tuple(ds.images.shape[1:]) != expected:
        raise MedgenError(f"the data's volumes have shape {tuple(ds.images.shape[1:])}; the checkpoint "
                          f"{meta['path']} expects {expected}")
    if list(ds.class_names) != list(meta["class_names"]):
        raise MedgenError(f"the data's classes {', '.join(ds.class_names)} differ from the checkpoint's "
                          f"{', '.join(meta['class_names'])}")
    return ds


def training_subjects(meta: dict[str, Any]) -> set[str]:
    """The subject ids the checkpoint was trained on (recorded in every checkpoint medgen writes)."""
    subjects = (meta.get("extra") or {}).get("subjects")
    if subjects is None:
        raise MedgenError(f"checkpoint {meta['path']} records no training subjects (written by an older medgen); "
                          "retrain it to evaluate on subjects it has not seen")
    return set(map(str, subjects))


def trained_classes(meta: dict[str, Any]) -> list[str]:
    """The classes the checkpoint was trained on: its config's train.classes, else all its classes."""
    chosen = ((meta.get("config") or {}).get("train") or {}).get("classes")
    return list(chosen) if chosen else list(meta["class_names"])


def unseen(ds: ImageSet, meta: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(positions of scans whose subject did not train the checkpoint, positions of those that did)."""
    seen = training_subjects(meta)
    held = [i for i, s in enumerate(ds.subjects) if s not in seen]
    used = [i for i, s in enumerate(ds.subjects) if s in seen]
    return held, used


def volume_writer(meta: dict[str, Any], scale: str = "data"):
    """A function (path, volume [X, Y, Z] on the model scale) -> None that saves NIfTI with the training affine and
    header codes, in the training data's intensity scale (scale "data") or the model's [-1, 1] ("model")."""
    mapping = intensity_map(meta["normalisation"], scale)
    codes = nifti_codes(meta["normalisation"])
    affine = np.asarray(meta["affine"], dtype=np.float64)

    def write(path: Path, volume: torch.Tensor | np.ndarray, intensity: bool = True) -> None:
        vol = torch.as_tensor(volume).float()
        vol = to_scale(vol, mapping) if intensity else vol
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nifti_volume(vol.numpy(), affine, codes), str(path))

    return write


def brain_mask(ds: ImageSet, reference: torch.Tensor | None = None) -> np.ndarray:
    """Brain voxels [*S]: where the mean volume (of `reference`, else all) is above the background (-0.9)."""
    imgs = ds.images if reference is None else reference
    return (imgs[:, 0].float().mean(dim=0) > -0.9).numpy()


def data_label(meta: dict[str, Any], data: str | os.PathLike | ImageSet | None) -> str:
    """What the volumes were, for result files: the --data spec, or the data the run's config names."""
    if isinstance(data, ImageSet):
        return "ImageSet"
    if data is not None:
        return str(data)
    cfg = meta.get("config") or {}
    path = (cfg.get("data") or {}).get("path")
    if path:
        return f"{path} (the run's training data)"
    ph = cfg.get("phantom") or {}
    return "built-in phantom " + ", ".join(f"{k} {ph[k]}" for k in ("n", "seed", "size") if k in ph) + \
        " (the run's training data)"
