"""The evaluate-synth pipeline: synthesis quality of a checkpoint against real data, per class.

Samples the checkpoint, trains the small feature classifier on the real data (for the Frechet
distance) and applies the measurements of medgen.evaluation.metrics.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from medgen.checkpoint import model_from_checkpoint
from medgen.config import TrainConfig
from medgen.data.dataset import ImageSet
from medgen.errors import MedgenError
from medgen.evaluation.metrics import (
    frechet_distance,
    leave_one_out_nn_rmse,
    mmd,
    ms_ssim_settings,
    nearest_neighbour_rmse,
    pairwise_ms_ssim,
)
from medgen.models.sampling import sample_images
from medgen.runtime import resolve_device
from medgen.training.loop import fit


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
) -> dict[str, Any]:
    """Per-class synthesis metrics of a checkpoint against real data.

    Args:
        checkpoint: a checkpoint file or run folder.
        real: real images (same grid as the checkpoint, same class names).
        n_per_class: synthetic volumes per class (default: as many as real ones of that class).
        seed: seed of the synthetic latents and the pair draws.
        device: where the generator and the feature network run.
        n_pairs: MS-SSIM pairs per set.
        classifier_iterations: training iterations of the feature classifier.
        extractor: features function to use instead of training one (tests).
    Returns:
        A JSON-ready dict: {"checkpoint", "model", "step", "settings", "classes": {name: metrics}}.
    """
    model, meta = model_from_checkpoint(checkpoint)
    if list(real.class_names) != list(meta["class_names"]):
        raise MedgenError(f"the data's classes {real.class_names} differ from the checkpoint's {meta['class_names']}")
    shape = tuple(real.images.shape[1:])
    dev = resolve_device(device) if isinstance(device, str) else device
    probe = sample_images(model, [0], seed=seed, device=dev)
    if tuple(probe.shape[1:]) != shape:
        raise MedgenError(f"the checkpoint makes images of shape {tuple(probe.shape[1:])} but the data has {shape}")
    if extractor is None:
        extractor = feature_extractor(real, seed=seed, iterations=classifier_iterations, device=dev)
    real_features = extractor(real.images)  # [N, F]
    classes: dict[str, Any] = {}
    for k, name in enumerate(meta["class_names"]):
        idx = torch.nonzero(real.labels == k).flatten()
        n = n_per_class or int(idx.numel())
        if idx.numel() < 2 or n < 2:
            raise MedgenError(f"class {name!r} needs at least 2 real and 2 synthetic volumes for these metrics")
        real_k = real.images[idx]
        synth = sample_images(model, [k] * n, seed=seed * 1000 + k, device=dev)
        nn_syn = nearest_neighbour_rmse(synth, real.images)
        # leave-one-out for real volumes: distance to the nearest *other* training volume
        nn_real = leave_one_out_nn_rmse(real.images, idx)
        classes[name] = {
            "n_real": int(idx.numel()),
            "n_synthetic": n,
            "ms_ssim_synthetic": pairwise_ms_ssim(synth, n_pairs=n_pairs, seed=seed),
            "ms_ssim_real": pairwise_ms_ssim(real_k, n_pairs=n_pairs, seed=seed),
            "mmd": mmd(real_k, synth, seed=seed),
            "frechet": frechet_distance(real_features[idx], extractor(synth)),
            "nn_rmse_synthetic_to_train": float(nn_syn.mean()),
            "nn_rmse_real_to_train": float(nn_real.mean()),
            "nn_ratio": float(nn_syn.mean() / nn_real.mean()),
            "nn_rmse_synthetic_min": float(nn_syn.min()),
        }
    kernel, weights = ms_ssim_settings(min(shape[1:]))
    return {
        "checkpoint": meta["path"],
        "checkpoint_sha256": meta["sha256"],
        "model": meta["model"],
        "step": meta["step"],
        "settings": {"seed": seed, "n_pairs": n_pairs, "ms_ssim_kernel": kernel,
                     "ms_ssim_weights": [round(w, 4) for w in weights], "image_shape": list(shape),
                     "classifier_iterations": classifier_iterations, "feature_dim": int(real_features.shape[1]),
                     "nn_distance": "RMSE per voxel, [-1, 1] scale",
                     "note": "the Frechet distance is noisy when a class has fewer volumes than feature_dim"},
        "classes": classes,
    }
