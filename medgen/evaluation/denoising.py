"""Denoising scores: PSNR and SSIM (MONAI metrics) of volumes against their clean originals."""

from __future__ import annotations

import torch
from monai.metrics import PSNRMetric, SSIMMetric

DATA_RANGE = 2.0  # the model scale [-1, 1]


def psnr_ssim(images: torch.Tensor, clean: torch.Tensor, data_range: float = DATA_RANGE) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-volume PSNR (dB, peak = data_range) and SSIM (Gaussian window 11, sigma 1.5) of images against clean.

    Args:
        images: [N, C, *spatial] volumes (noisy or denoised).
        clean: [N, C, *spatial] originals.
        data_range: the intensity range (2 for the model scale [-1, 1]).
    Returns:
        (psnr [N], ssim [N]).
    """
    images, clean = images.float(), clean.float()
    psnr = PSNRMetric(max_val=data_range, reduction="none")(images, clean).reshape(-1)
    ssim = SSIMMetric(spatial_dims=images.ndim - 2, data_range=data_range, reduction="none")(images, clean).reshape(-1)
    return psnr, ssim
