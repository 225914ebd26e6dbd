"""`medgen denoise`: how well an autoencoder removes noise from volumes it has not seen (PSNR, SSIM).

The protocol of the denoising autoencoder: train with noise levels drawn from 0-20 %
(`medgen train vae --input-noise 0.2 --holdout 0.2`), then test on held-out volumes at fixed levels (5, 10,
15, 20 %). Noise is additive Gaussian at a share of the intensity range (medgen.data.augmentation.add_noise;
10 % = SD 0.2 on the model scale [-1, 1]), drawn from a seeded generator. Each noisy volume is reconstructed
(vae: posterior mean; alpha-gan: G(E(x))) with its own class as condition (the first trained class for a
model trained on fewer classes), and scored against the clean volume beside the noisy input and a Gaussian
smoothing baseline (MONAI GaussianFilter, sigma 1 voxel).

Output folder (written atomically):
    metrics.json   per level: PSNR and SSIM of noisy, denoised and smoothed volumes (mean, SD), the PSNR gain
    table.csv      the same as rows; per_volume.csv: every volume and level
    examples/<scan>_noise-10_{clean,noisy,denoised}.nii.gz   training affine and intensity scale
    examples.png  psnr.png  ssim.png  index.html
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.networks.layers import GaussianFilter

from medgen.console import log
from medgen.data.augmentation import add_noise
from medgen.data.dataset import ImageSet
from medgen.errors import MedgenError
from medgen.evaluation.denoising import psnr_ssim
from medgen.models.sampling import reconstruct
from medgen.outputs import atomic_write_bytes, check_output_dir, staged_dir
from medgen.pipelines.autoencoders import (
    checkpoint_data,
    data_label,
    load_autoencoder,
    trained_classes,
    unseen,
    volume_writer,
)
from medgen.pipelines.site import write_page_safely
from medgen.runtime import resolve_device
from medgen.viz import plot_denoise, save_strip

LEVELS = (0.05, 0.10, 0.15, 0.20)
BASELINE_SIGMA = 1.0
EXAMPLES = 2  # volumes whose clean / noisy / denoised NIfTI are written at every level


def denoise(checkpoint: str | Path, data: str | Path | ImageSet | None, out: str | Path, *,
            levels: Sequence[float] = LEVELS, n: int | None = None, seed: int = 0, batch_size: int = 8,
            device: str = "auto", overwrite: bool = False) -> dict[str, Any]:
    """Add noise to held-out volumes at each level, denoise them with the autoencoder, score and write the folder.

    Args:
        checkpoint: a vae or alpha-gan checkpoint or run folder.
        data: the volumes (dataset spec or ImageSet); None: the data the run trained on.
        out: output folder (refused when it exists, unless overwrite).
        levels: noise levels (shares of the intensity range, each in (0, 1]).
        n: use at most n held-out volumes (all when None).
        seed: seed of the noise.
        batch_size: volumes per forward pass.
        device: auto | cpu | cuda.
        overwrite: replace an existing output folder.
    Returns:
        The metrics (also metrics.json).
    """
    levels = [float(v) for v in levels]
    if not levels or any(not 0.0 < v <= 1.0 for v in levels):
        raise MedgenError(f"--levels must be noise levels in (0, 1] (0.1 = 10 %), got {', '.join(map(str, levels))}")
    if n is not None and n < 1:
        raise MedgenError(f"--n must be at least 1, got {n}")
    inputs = [checkpoint, None if isinstance(data, ImageSet) else data]
    check_output_dir(out, overwrite=overwrite, inputs=inputs)
    model, meta = load_autoencoder(checkpoint)
    names = meta["class_names"]
    trained = [names.index(c) for c in trained_classes(meta)]
    ds = checkpoint_data(meta, data)
    held, _ = unseen(ds, meta)
    if not held:
        raise MedgenError(f"every subject of the data trained the checkpoint {meta['path']}; nothing held out to "
                          "test on (train with --holdout, or give --data with other subjects)")
    test = ds.subset(held[:n] if n else held)
    labels = [int(y) if int(y) in trained else trained[0] for y in test.labels.tolist()]
    dev = resolve_device(device)
    smooth = GaussianFilter(3, BASELINE_SIGMA)
    gen = torch.Generator().manual_seed(int(seed))
    clean = test.images.float()
    log(f"denoising {len(test)} held-out volumes at {len(levels)} noise levels")
    recon_clean = reconstruct(model, clean, labels, batch_size=batch_size, device=dev)
    p0, s0 = psnr_ssim(recon_clean, clean)
    rows, per_volume, examples = [], [], {}
    for level in levels:
        eps = torch.randn(clean.shape, generator=gen)
        noisy = add_noise(clean, level, eps)
        denoised = reconstruct(model, noisy, labels, batch_size=batch_size, device=dev)
        smoothed = smooth(noisy)
        scores = {name: psnr_ssim(v, clean) for name, v in (("noisy", noisy), ("denoised", denoised),
                                                             ("smoothed", smoothed))}
        row: dict[str, Any] = {"level": level, "level_percent": round(100 * level, 2)}
        for name, (p, s) in scores.items():
            row[f"psnr_{name}"] = round(float(p.mean()), 3)
            row[f"psnr_{name}_sd"] = round(float(p.std()), 3) if len(p) > 1 else 0.0
            row[f"ssim_{name}"] = round(float(s.mean()), 4)
        gain = scores["denoised"][0] - scores["noisy"][0]
        row["psnr_gain_db"] = round(float(gain.mean()), 3)
        row["psnr_gain_sd"] = round(float(gain.std()), 3) if len(gain) > 1 else 0.0
        row["ssim_gain"] = round(float((scores["denoised"][1] - scores["noisy"][1]).mean()), 4)
        rows.append(row)
        for i in range(len(test)):
            per_volume.append([test.subjects[i], level, *[round(float(scores[k][j][i]), 5)
                                                         for k in ("noisy", "denoised", "smoothed") for j in (0, 1)]])
        examples[level] = (noisy[:EXAMPLES], denoised[:EXAMPLES])
    metrics: dict[str, Any] = {
        "checkpoint": str(meta["path"]), "model": meta["model"], "checkpoint_step": meta["step"],
        "input_noise_trained": float((meta.get("step_kwargs") or {}).get("input_noise", 0.0)),
        "data": data_label(meta, data),
        "volumes": len(test), "held_out_subjects": len(set(test.subjects)),
        "leakage_check": "no test subject is among the checkpoint's training subjects (checked)",
        "clean_reconstruction": {"psnr": round(float(p0.mean()), 3), "ssim": round(float(s0.mean()), 4)},
        "levels": rows,
        "settings": {"noise": "additive Gaussian, SD = level x 2 (the model scale [-1, 1])", "seed": seed,
                     "metrics": "MONAI PSNRMetric (max_val 2) and SSIMMetric (data_range 2, Gaussian window 11)",
                     "baseline": f"Gaussian smoothing, sigma {BASELINE_SIGMA:g} voxel", "grid": int(clean.shape[-1])},
    }
    with staged_dir(out, overwrite=overwrite, inputs=inputs, command="denoise") as tmp:
        write = volume_writer(meta)
        names_ex = [Path(test.sources[i]).name.split(".")[0] if test.sources else test.subjects[i]
                    for i in range(min(EXAMPLES, len(test)))]
        strip = []
        for j, scan in enumerate(names_ex):
            write(tmp / "examples" / f"{scan}_clean.nii.gz", clean[j, 0])
            vols, cols = [clean[j, 0].numpy()], ["clean"]
            for level, (noisy, den) in examples.items():
                tag = f"noise-{round(100 * level):02d}"
                write(tmp / "examples" / f"{scan}_{tag}_noisy.nii.gz", noisy[j, 0])
                write(tmp / "examples" / f"{scan}_{tag}_denoised.nii.gz", den[j, 0])
                vols += [noisy[j, 0].clamp(-1, 1).numpy(), den[j, 0].numpy()]
                cols += [f"{100 * level:g} % noisy", f"{100 * level:g} % denoised"]
            strip.append((scan, vols, cols))
        save_strip(strip, tmp / "examples.png", title=f"{meta['model']} denoising (held-out volumes)")
        with open(tmp / "table.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        with open(tmp / "per_volume.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["subject", "level", "psnr_noisy", "ssim_noisy", "psnr_denoised", "ssim_denoised",
                        "psnr_smoothed", "ssim_smoothed"])
            w.writerows(per_volume)
        for metric, label in (("psnr", "PSNR (dB)"), ("ssim", "SSIM")):
            series = {k: [r[f"{metric}_{k}"] for r in rows] for k in ("noisy", "denoised", "smoothed")}
            atomic_write_bytes(tmp / f"{metric}.png", plot_denoise(levels, series, label,
                                                                  title=f"{label} against the clean volume"))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        write_page_safely(tmp, "denoise", name=Path(out).name)
    return metrics
