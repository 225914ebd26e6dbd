"""Training step of the conditional VAE: reconstruction + beta * KL, one Adam optimizer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medgen import losses
from medgen.data.augmentation import add_noise
from medgen.errors import MedgenError
from medgen.models.blocks import checkerboard_coefficients
from medgen.models.vae import VAE
from medgen.training.steps.base import Batch, Step, StepContext, register_step


@register_step(VAE)
@dataclass
class VAEStep(Step):
    """recon(x, G(z)) + beta * KL(q(z | x, y) || N(0, I)).

    Args:
        beta: KL weight. Both terms are per-element means, so beta 1 weighs the KL hundreds of times
            more than the ELBO does and collapses the posterior (KL ~0.002 per unit on a toy 16^3
            set); 0.01 keeps the latent in use.
        recon: reconstruction loss, "l1" or "mse".
        kl_per_element: KL averaged over latent units (True) or summed per sample (False).
        kl_warmup: fraction of the run over which beta ramps linearly from 0 (0: no warm-up).
        beta1: Adam beta1.
        beta2: Adam beta2.
        input_noise: denoising training: the encoder sees each volume with Gaussian noise at a level drawn
            uniformly from [0, input_noise] (a share of the intensity range, medgen.data.augmentation.add_noise)
            and the loss compares the reconstruction with the clean volume (0: a plain VAE).
    """

    beta: float = 0.01
    recon: str = "l1"
    kl_per_element: bool = True
    kl_warmup: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    input_noise: float = 0.0

    def __post_init__(self) -> None:
        if self.recon not in losses.RECONSTRUCTIONS:
            raise MedgenError(f"steps.vae: recon must be one of {', '.join(losses.RECONSTRUCTIONS)}, "
                              f"got {self.recon!r}")
        if self.beta < 0 or not 0 <= self.kl_warmup <= 1:
            raise MedgenError("steps.vae: beta must be >= 0 and kl_warmup in [0, 1]")
        if not 0 <= self.input_noise <= 1:
            raise MedgenError(f"steps.vae: input_noise must be in [0, 1], got {self.input_noise!r}")

    def optimizers(self, model: nn.Module, lr: float) -> dict[str, torch.optim.Optimizer]:
        return {"vae": torch.optim.Adam(model.parameters(), lr=lr, betas=(self.beta1, self.beta2))}

    def beta_at(self, ctx: StepContext) -> float:
        """KL weight at this iteration (linear warm-up over kl_warmup * total_iterations)."""
        ramp = self.kl_warmup * ctx.total_iterations
        return self.beta if ramp <= 0 else self.beta * min(1.0, (ctx.iteration + 1) / ramp)

    def __call__(self, model: nn.Module, batch: Batch, opt: dict[str, torch.optim.Optimizer],
                 ctx: StepContext) -> dict[str, torch.Tensor]:
        inputs = batch.images
        if self.input_noise > 0:
            b = inputs.shape[0]
            levels = self.input_noise * ctx.rand(b, device=inputs.device)  # [B] in [0, input_noise)
            inputs = add_noise(inputs, levels, ctx.randn(*inputs.shape, device=inputs.device))
        with ctx.precision.autocast():
            noise = ctx.randn(batch.images.shape[0], model.latent_dim, device=batch.images.device)
            out = model(inputs, batch.labels, noise=noise)
        rec = losses.reconstruction(out.recon, batch.images, self.recon)
        kl = losses.kl_divergence(out.mu, out.logvar, per_element=self.kl_per_element)
        loss = rec + self.beta_at(ctx) * kl
        ctx.backward_step(loss, opt["vae"], "vae")
        values = {"loss": loss.detach(), "recon": rec.detach(), "kl": kl.detach()}
        if model.decoder.observation_noise:
            values["noise_sd"] = fit_noise(model.decoder, out.recon.detach().float(), batch.images.float())
        return values


def fit_noise(decoder: nn.Module, recon: torch.Tensor, x: torch.Tensor, rate: float = 0.05) -> torch.Tensor:
    """Move the decoder's observation noise sd towards this batch's estimate (an exponential average of log sd
    at `rate`; no gradient) and return the new sd.

    The estimate is Donoho's robust noise level: the median absolute finest-scale diagonal Haar coefficient of
    the residual x - recon, over the noise scale (1 + recon) / 2, divided by 0.6745, on the blocks where that
    scale averages above 0.5 (tissue; the background is left out). The finest diagonal detail is where voxel
    noise dominates and the smooth misfit of the anatomy is small.
    """
    scale = F.avg_pool3d((1 + recon) / 2, 2) if recon.ndim == 5 else F.avg_pool2d((1 + recon) / 2, 2)
    coef = checkerboard_coefficients(x - recon, 2 ** ((x.ndim - 2) / 2))  # orthonormal: noise sd kept
    keep = scale > 0.5
    with torch.no_grad():
        if bool(keep.any()):
            estimate = ((coef[keep] / scale[keep]).abs().median() / 0.6745).clamp_min(1e-6)
            decoder.log_noise.lerp_(estimate.log().to(decoder.log_noise.dtype), rate)
        return decoder.log_noise.exp().detach()
