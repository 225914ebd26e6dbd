"""Training step of the conditional GAN: WGAN-GP (Gulrajani et al. 2017) with a projection critic."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medgen import losses
from medgen.errors import MedgenError
from medgen.models.gan import GAN
from medgen.training.steps.base import Batch, Step, StepContext, register_step
from medgen.training.steps.common import frozen, uniform


def _noise(G: nn.Module, x: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
    """Standard normal like x for a generator with observation noise, else None."""
    return ctx.randn(*x.shape, device=x.device) if G.observation_noise else None


@register_step(GAN)
@dataclass
class GANStep(Step):
    """One iteration = n_critic critic updates (fresh noise each, same real batch) + one generator update.

    Args:
        n_critic: critic updates per generator update.
        gp_weight: gradient-penalty weight (lambda = 10 in WGAN-GP).
        beta1: Adam beta1 (0.5 or 0.0 for WGAN-GP).
        beta2: Adam beta2 (0.9 for WGAN-GP).
        d_lr_scale: critic learning rate = lr * d_lr_scale.
    """

    n_critic: int = 5
    gp_weight: float = 10.0
    beta1: float = 0.5
    beta2: float = 0.9
    d_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.n_critic < 1:
            raise MedgenError(f"steps.gan: n_critic must be >= 1, got {self.n_critic}")

    def optimizers(self, model: nn.Module, lr: float) -> dict[str, torch.optim.Optimizer]:
        betas = (self.beta1, self.beta2)
        return {"generator": torch.optim.Adam(model.generator.parameters(), lr=lr, betas=betas),
                "discriminator": torch.optim.Adam(model.discriminator.parameters(), lr=lr * self.d_lr_scale,
                                                  betas=betas)}

    def __call__(self, model: nn.Module, batch: Batch, opt: dict[str, torch.optim.Optimizer],
                 ctx: StepContext) -> dict[str, torch.Tensor]:
        G, D = model.generator, model.discriminator
        x, y = batch.images, batch.labels
        b, device = x.shape[0], x.device
        for _ in range(self.n_critic):
            z = ctx.randn(b, model.latent_dim, device=device)
            with ctx.precision.autocast():
                with torch.no_grad():
                    fake = G(z, y, _noise(G, x, ctx))
                # one critic call on [real; fake]: [2B, C, ...] -> [2B]
                real_score, fake_score = D(torch.cat([x, fake.to(x.dtype)]), torch.cat([y, y])).chunk(2)
            critic = losses.wgan_critic_loss(real_score, fake_score)
            gp = losses.gradient_penalty(D, x, fake, y, alpha=uniform(ctx, b, device))
            d_loss = critic + self.gp_weight * gp
            ctx.backward_step(d_loss, opt["discriminator"], "discriminator")
        z = ctx.randn(b, model.latent_dim, device=device)
        with frozen(D):
            with ctx.precision.autocast():
                fake_score = D(G(z, y, _noise(G, x, ctx)), y)
            g_loss = losses.wgan_generator_loss(fake_score)
            ctx.backward_step(g_loss, opt["generator"], "generator")
        return {"d_loss": d_loss.detach(), "g_loss": g_loss.detach(), "gp": gp.detach(),
                "wasserstein": -critic.detach()}
