"""Training step of the parallel-decoder VAE: reconstruction + scheduled, per-decoder KL (DESIGN.md section 6).

    loss = mean((recon - x)^2) + g(t) * sum_k (m * KL_k / n) ** e

with n the number of input elements (C * prod(S)), KL_k the KL divergence of decoder k's posterior
(summed over its latent dims, averaged over the batch), g(t) a linear schedule from `kl_start` to
`kl_end` over the run, m the individual multiplier and e the individual exponent. Both terms are per
input element, so the weights transfer between 128^2 x 3 scenes and 64^3 volumes. An exponent > 1
penalises one decoder holding much information more than several holding a little, which pushes the
decoders to share the scene. (Reference settings that summed raw KL, g_ref, convert as g = g_ref * n**e.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medgen.models.parallel_vae import ParallelVAE
from medgen.training.steps.base import Batch, Step, StepContext, register_step


def kl_per_decoder(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z_k|x) || N(0, I)) per decoder, summed over latent dims and averaged over the batch.

    Args:
        mu: [B, K, L] posterior means.
        logvar: [B, K, L] posterior log-variances.
    Returns:
        [K] KL in nats.
    """
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)  # [B, K, L]
    return kl.sum(dim=2).mean(dim=0)


def kl_multiplier(kl_start: float, kl_end: float, iteration: int, total_iterations: int) -> float:
    """Linear schedule from kl_start (iteration 0) to kl_end (last iteration)."""
    frac = min(max(iteration / max(total_iterations - 1, 1), 0.0), 1.0)
    return kl_start + (kl_end - kl_start) * frac


def kl_term(kl: torch.Tensor, *, elements: int, multiplier: float, individual_multiplier: float,
            individual_exponent: float) -> torch.Tensor:
    """g * sum_k (m * KL_k / n) ** e, the KL part of the loss.

    Args:
        kl: [K] per-decoder KL in nats.
        elements: n, number of elements of one input (C * prod(S)).
        multiplier: g, the scheduled global multiplier.
        individual_multiplier: m.
        individual_exponent: e.
    """
    return multiplier * (individual_multiplier * kl / elements).clamp_min(0).pow(individual_exponent).sum()


@register_step(ParallelVAE)
@dataclass
class ParallelVAEStep(Step):
    """Hyper-parameters (config `steps.parallel-vae`).

    Attributes:
        kl_start: global KL multiplier at the first iteration.
        kl_end: global KL multiplier at the last iteration (linear in between).
        individual_multiplier: m, scales each decoder's per-element KL before the exponent.
        individual_exponent: e, exponent on each decoder's scaled KL (1: plain beta-VAE).
        beta1: Adam beta1.
        beta2: Adam beta2.
    """

    kl_start: float = 0.0
    kl_end: float = 1.0
    individual_multiplier: float = 100.0
    individual_exponent: float = 2.0
    beta1: float = 0.9
    beta2: float = 0.999

    def optimizers(self, model: nn.Module, lr: float) -> dict[str, torch.optim.Optimizer]:
        return {"vae": torch.optim.Adam(model.parameters(), lr=lr, betas=(self.beta1, self.beta2))}

    def __call__(self, model: nn.Module, batch: Batch, opt: dict[str, torch.optim.Optimizer],
                 ctx: StepContext) -> dict[str, torch.Tensor]:
        x = batch.images
        noise = ctx.randn(x.shape[0], model.num_decoders, model.latent_per_decoder, device=x.device)
        with ctx.precision.autocast():
            out = model(x, batch.labels, noise=noise)
        recon = torch.mean((out.recon.float() - x.float()) ** 2)
        kl = kl_per_decoder(out.mu.float(), out.logvar.float())
        g = kl_multiplier(self.kl_start, self.kl_end, ctx.iteration, ctx.total_iterations)
        kl_loss = kl_term(kl, elements=x[0].numel(), multiplier=g, individual_multiplier=self.individual_multiplier,
                          individual_exponent=self.individual_exponent)
        loss = recon + kl_loss
        ctx.backward_step(loss, opt["vae"], "vae")
        return {"loss": loss.detach(), "recon": recon.detach(), "kl": kl.sum().detach(),
                "kl_term": kl_loss.detach(), "kl_mult": torch.tensor(g)}
