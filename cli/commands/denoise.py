"""`medgen denoise`: PSNR and SSIM of an autoencoder's denoising on held-out volumes at several noise levels."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medgen.cli.common import DeviceOpt, OutOpt, OverwriteOpt, echo_json, handle_errors


def register(app: typer.Typer) -> None:
    app.command("denoise")(denoise)


@handle_errors
def denoise(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="vae or alpha-gan checkpoint or run folder "
                                             "(denoising-trained: train vae --input-noise 0.2 --holdout 0.2).")],
    out: OutOpt,
    data: Annotated[str | None, typer.Option("--data", help="Volumes (phantom folder, datalist, table).",
                                             show_default="the data the run trained on")] = None,
    levels: Annotated[str, typer.Option("--levels", help="Noise levels, comma-separated shares of the intensity "
                                        "range (0.1 = 10 %: Gaussian SD 0.2 on [-1, 1]).")] = "0.05,0.1,0.15,0.2",
    n: Annotated[int | None, typer.Option("--n", min=1, help="At most N held-out volumes.", show_default="all")] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**32 - 1, help="Seed of the noise.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Volumes per forward pass.")] = 8,
    device: DeviceOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Add Gaussian noise to the volumes the checkpoint never saw, denoise them, and compare PSNR / SSIM of the
    noisy, denoised and Gaussian-smoothed volumes against the clean ones."""
    from medgen.pipelines.denoise import denoise as run

    try:
        values = [float(v) for v in levels.split(",") if v.strip()]
    except ValueError:
        from medgen.cli.common import fail

        fail(f"--levels: not a comma-separated list of numbers: {levels!r}", code=2)
    m = run(checkpoint, data, out, levels=values, n=n, seed=seed, batch_size=batch_size, device=device or "auto",
            overwrite=overwrite)
    echo_json({"out": str(out), "volumes": m["volumes"], "clean_reconstruction": m["clean_reconstruction"],
               "levels": [{k: r[k] for k in ("level_percent", "psnr_noisy", "psnr_denoised", "psnr_smoothed",
                                             "psnr_gain_db", "ssim_noisy", "ssim_denoised")} for r in m["levels"]]})
