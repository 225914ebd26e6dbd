"""Synthesis quality against real data, per class (`medgen evaluate-synth`).

- diversity: MS-SSIM among random synthetic pairs vs among real pairs (mode collapse -> higher synthetic value);
- distribution distance: MMD on voxels (MONAI MMDMetric) and a Frechet distance (MONAI FIDMetric) on the
  pooled features of a small 3D classifier trained on the real data;
- memorisation: RMSE of each synthetic volume to its nearest training volume vs the same for each real volume
  to its nearest other training volume (a synthetic/real ratio well below 1 suggests copies).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from medgen.data.dataset import ImageSet
from medgen.errors import MedgenError

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001)  # the first three MONAI/Wang et al. scales, renormalised below


def ms_ssim_settings(size: int) -> tuple[int, tuple[float, ...]]:
    """Kernel size and scale weights valid for an image edge of `size` voxels.

    MONAI requires size // (len(weights) - 1) ** 2 > kernel_size - 1; three scales with kernel 7 fit 64^3
    and 32^3, kernel 3 fits 16^3. Smaller images use two scales.
    """
    weights = MS_SSIM_WEIGHTS if size >= 12 else MS_SSIM_WEIGHTS[1:]
    div = max(1, len(weights) - 1) ** 2
    kernel = min(7, size // div)
    kernel = kernel if kernel % 2 == 1 else kernel - 1
    if kernel < 3:
        raise MedgenError(f"images of edge {size} are too small for MS-SSIM (need at least 12)")
    total = sum(weights)
    return kernel, tuple(w / total for w in weights)


def pairwise_ms_ssim(images: torch.Tensor, *, n_pairs: int = 50, seed: int = 0) -> float:
    """Mean MS-SSIM over random distinct pairs of a set of images (diversity; lower is more diverse).

    Args:
        images: [N, C, *spatial] in [-1, 1], N >= 2.
        n_pairs: pairs drawn (all pairs when there are fewer).
        seed: seed of the pair draw.
    """
    from monai.metrics import MultiScaleSSIMMetric

    n = images.shape[0]
    if n < 2:
        return float("nan")
    pairs = torch.combinations(torch.arange(n), 2)  # [P, 2]
    if pairs.shape[0] > n_pairs:
        pick = torch.randperm(pairs.shape[0], generator=torch.Generator().manual_seed(seed))[:n_pairs]
        pairs = pairs[pick]
    kernel, weights = ms_ssim_settings(min(images.shape[2:]))
    metric = MultiScaleSSIMMetric(spatial_dims=images.ndim - 2, data_range=1.0, kernel_size=kernel,
                                  weights=weights, reduction="mean")
    x = (images.float() + 1) / 2  # to [0, 1] for the luminance term
    values = []
    for i in range(0, pairs.shape[0], 16):
        p = pairs[i : i + 16]
        values.append(metric(x[p[:, 0]], x[p[:, 1]]).reshape(-1))  # [b]
    return float(torch.cat(values).mean())


def mmd(real: torch.Tensor, synthetic: torch.Tensor, *, seed: int = 0) -> float:
    """MONAI MMDMetric (linear kernel) between equally many real and synthetic volumes, per voxel.

    The larger set is subsampled; voxel vectors are scaled by 1/sqrt(V) so the value does not grow with
    the image size.
    """
    from monai.metrics import MMDMetric

    m = min(real.shape[0], synthetic.shape[0])
    if m < 2:
        return float("nan")
    g = torch.Generator().manual_seed(seed)
    r = real[torch.randperm(real.shape[0], generator=g)[:m]].float()
    s = synthetic[torch.randperm(synthetic.shape[0], generator=g)[:m]].float()
    scale = r[0].numel() ** 0.5
    return float(MMDMetric(y_mapping=lambda t: t / scale)(r, s))


def frechet_distance(real_features: torch.Tensor, synthetic_features: torch.Tensor) -> float:
    """Frechet distance between two feature sets [N, F] (MONAI FIDMetric)."""
    import contextlib
    import sys
    import warnings

    from monai.metrics import FIDMetric

    if real_features.shape[0] < 2 or synthetic_features.shape[0] < 2:
        return float("nan")
    # Fewer samples than features gives singular covariances: expected here. MONAI reports that with a
    # print(), which must not reach stdout (stdout carries the command's JSON result).
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        return float(FIDMetric()(synthetic_features.double(), real_features.double()))


def nearest_neighbour_rmse(queries: torch.Tensor, reference: torch.Tensor, *, exclude_self: bool = False) -> torch.Tensor:
    """Per-query RMSE to the closest reference image.

    Args:
        queries: [Q, C, *spatial].
        reference: [R, C, *spatial].
        exclude_self: queries are the reference set itself; ignore the zero self-distance.
    Returns:
        [Q] RMSE per voxel to the nearest reference.
    """
    q = queries.reshape(queries.shape[0], -1).float()  # [Q, V]
    r = reference.reshape(reference.shape[0], -1).float()  # [R, V]
    d = torch.cdist(q, r) / q.shape[1] ** 0.5  # [Q, R]
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    return d.min(dim=1).values


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
    from medgen.config import TrainConfig
    from medgen.runtime import resolve_device
    from medgen.training.checkpoint import model_from_checkpoint
    from medgen.training.loop import fit

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
    from medgen.runtime import resolve_device
    from medgen.synthesis import sample_images
    from medgen.training.checkpoint import model_from_checkpoint

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
        nn_real = _leave_one_out_nn(real.images, idx)
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


def _leave_one_out_nn(reference: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """RMSE of each reference[idx] to its nearest other reference image."""
    q = reference[idx].reshape(idx.numel(), -1).float()  # [Q, V]
    r = reference.reshape(reference.shape[0], -1).float()  # [R, V]
    d = torch.cdist(q, r) / q.shape[1] ** 0.5  # [Q, R]
    d[torch.arange(idx.numel()), idx] = float("inf")
    return d.min(dim=1).values
