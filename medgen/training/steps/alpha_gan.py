"""Training step of the conditional alpha-GAN (Rosca et al. 2017; Kwon et al. 2019), WGAN-GP by default.

Each iteration updates each network exactly once, in this order:
1. encoder + generator (one Adam over both; Adam is per-parameter, so this equals two optimizers
   stepped once each on the same loss): l1_weight * L1(x, G(E(x))) + adversarial terms of D on the
   reconstructions and on prior samples G(z), + the code critic's term on E(x);
2. image critic D: real x against reconstructions and prior samples (+ gradient penalty);
3. code critic C: prior codes z ~ N(0, I) against E(x) (+ gradient penalty).
The critics reuse the (detached) outputs of pass 1, so no network runs a second forward for them,
and nothing is modified in place between a forward pass and its backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medgen import losses
from medgen.errors import MedgenError
from medgen.models.alpha_gan import AlphaGAN
from medgen.training.steps.base import Batch, Step, StepContext, register_step
from medgen.training.steps.common import frozen, uniform

VARIANTS = ("wgan-gp", "bce")


@register_step(AlphaGAN)
@dataclass
class AlphaGANStep(Step):
    """alpha-GAN iteration: one update each of E+G, D and C.

    Args:
        variant: "wgan-gp" (Wasserstein critics with gradient penalties) or "bce" (non-saturating GAN).
        l1_weight: weight of the L1 reconstruction term (Kwon et al.: 10).
        gp_weight: gradient-penalty weight of both critics (wgan-gp only).
        code_weight: weight of the code critic's term in the encoder loss.
        beta1: Adam beta1.
        beta2: Adam beta2.
        d_lr_scale: critics' learning rate = lr * d_lr_scale.
        maps_from_reconstruction: the generator's full-resolution free maps (the warp output's template, the
            class offset) learn from the L1 term alone. Why: a map is one parameter per voxel, with no
            convolution between it and the critic, so the critic's high-frequency gradients print straight
            into it as speckle and checkerboards; the fields and weights still learn from every term.
        offset_loss: with maps_from_reconstruction, the reconstruction loss the class offset learns from: "l1"
            (the template's) or "mse" (l1_weight * squared error). Why: under L1 each offset voxel settles at
            the median residual of its class, which leaves a structure that only some subjects have (large
            ventricles) unexplained and the class's mean anatomy off; under the squared error it settles at
            the mean residual. The template keeps L1 (a median of misregistered edges stays sharp).
    """

    variant: str = "wgan-gp"
    l1_weight: float = 10.0
    gp_weight: float = 10.0
    code_weight: float = 1.0
    beta1: float = 0.5
    beta2: float = 0.9
    d_lr_scale: float = 1.0
    maps_from_reconstruction: bool = False
    offset_loss: str = "l1"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise MedgenError(f"steps.alpha-gan: variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.offset_loss not in ("l1", "mse"):
            raise MedgenError(f"steps.alpha-gan: offset_loss must be l1 or mse, got {self.offset_loss!r}")
        if self.offset_loss != "l1" and not self.maps_from_reconstruction:
            raise MedgenError("steps.alpha-gan: offset_loss needs maps_from_reconstruction: true")

    def optimizers(self, model: nn.Module, lr: float) -> dict[str, torch.optim.Optimizer]:
        betas = (self.beta1, self.beta2)
        d_lr = lr * self.d_lr_scale
        return {
            "encoder_generator": torch.optim.Adam(
                [{"params": model.encoder.parameters()}, {"params": model.generator.parameters()}]
                + ([{"params": model.prior.parameters()}] if getattr(model, "prior", None) is not None else []),
                lr=lr, betas=betas),
            "discriminator": torch.optim.Adam(model.discriminator.parameters(), lr=d_lr, betas=betas),
            "code_discriminator": torch.optim.Adam(model.code_discriminator.parameters(), lr=d_lr, betas=betas),
        }

    @staticmethod
    def _reconstruction_only(G: nn.Module, template_term: torch.Tensor, offset_term: torch.Tensor,
                             ctx: StepContext) -> list:
        """Hooks that replace the gradient of G's free maps by that of their reconstruction term (template,
        class offset; scaled like the loss under fp16); remove them after the backward pass."""
        pairs = [(p, t) for p, t in ((getattr(G, "template", None), template_term),
                                     (getattr(G.offset, "weight", None), offset_term)) if p is not None]
        if not pairs:
            return []
        maps = [p for p, _ in pairs]
        if all(t is pairs[0][1] for _, t in pairs):  # one term for both maps: one backward pass
            grads = list(torch.autograd.grad(pairs[0][1], maps, retain_graph=True, allow_unused=True))
        else:
            grads = [torch.autograd.grad(t, p, retain_graph=True, allow_unused=True)[0] for p, t in pairs]
        scaler = ctx.scalers.get("encoder_generator")
        factor = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
        return [p.register_hook(lambda _, g=g, p=p: (torch.zeros_like(p) if g is None else g * factor))
                for p, g in zip(maps, grads, strict=True)]

    def _gen_loss(self, score: torch.Tensor) -> torch.Tensor:
        return losses.wgan_generator_loss(score) if self.variant == "wgan-gp" else losses.bce_generator_loss(score)

    def _critic_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        if self.variant == "wgan-gp":
            return losses.wgan_critic_loss(real, fake)
        return losses.bce_critic_loss(real, fake)

    def __call__(self, model: nn.Module, batch: Batch, opt: dict[str, torch.optim.Optimizer],
                 ctx: StepContext) -> dict[str, torch.Tensor]:
        E, G, D, C = model.encoder, model.generator, model.discriminator, model.code_discriminator
        x, y = batch.images, batch.labels
        b = x.shape[0]
        z_prior = ctx.randn(b, model.latent_dim, device=x.device)
        y2 = torch.cat([y, y])
        wgan = self.variant == "wgan-gp"

        # 1. encoder + generator
        with frozen(D, C):
            with ctx.precision.autocast():
                code = E(x, y)
                latents = torch.cat([code, z_prior.to(code.dtype)])  # [2B, L]: [E(x); z]
                if getattr(model, "prior", None) is not None:  # class prior: the critic sees E(x) - m_y, G gets z + m_y
                    code = code - model.prior_mean(y, code)
                    latents = torch.cat([code, z_prior.to(code.dtype)]) + model.prior_mean(y2, code)
                both = G(latents, y2)  # one generator call: [2B, L] -> [2B, C, ...]
                recon = both[:b]  # the L1 term sees the mean image; the critic its observation noise too
                if G.observation_noise:
                    both = G.add_noise(both, ctx.randn(2 * b, *x.shape[1:], device=x.device))
                both_score = D(both, y2)
                code_score = C(code)
            l1 = losses.reconstruction(recon, x, "l1")
            adv = self._gen_loss(both_score)  # mean over reconstructions and prior samples
            code_adv = self._gen_loss(code_score)
            eg_loss = self.l1_weight * l1 + 2.0 * adv + self.code_weight * code_adv
            hooks = []
            if self.maps_from_reconstruction:
                l1_term = self.l1_weight * l1
                offset_term = l1_term if self.offset_loss == "l1" else \
                    self.l1_weight * losses.reconstruction(recon, x, "mse")
                hooks = self._reconstruction_only(G, l1_term, offset_term, ctx)
            ctx.backward_step(eg_loss, opt["encoder_generator"], "encoder_generator")
            for hook in hooks:
                hook.remove()

        # 2. image critic: x against [recon; prior]
        fakes = both.detach().to(x.dtype)
        with ctx.precision.autocast():
            # [3B, C, ...] -> [3B]
            scores = D(torch.cat([x, fakes]), torch.cat([y, y2]))
        real_score, fake_score = scores[:b], scores[b:]
        d_loss = self._critic_loss(real_score, fake_score)
        gp = torch.zeros((), device=x.device)
        if wgan:
            alpha = torch.cat([uniform(ctx, b, x.device), uniform(ctx, b, x.device)])
            gp = losses.gradient_penalty(D, torch.cat([x, x]), fakes, y2, alpha=alpha)
            d_loss = d_loss + self.gp_weight * gp
        ctx.backward_step(d_loss, opt["discriminator"], "discriminator")

        # 3. code critic: prior codes against encoder codes
        codes = code.detach().float()
        with ctx.precision.autocast():
            c_scores = C(torch.cat([z_prior, codes]))  # [2B]
        c_loss = self._critic_loss(c_scores[:b], c_scores[b:])
        gp_code = torch.zeros((), device=x.device)
        if wgan:
            gp_code = losses.gradient_penalty(C, z_prior, codes, None, alpha=uniform(ctx, b, x.device))
            c_loss = c_loss + self.gp_weight * gp_code
        ctx.backward_step(c_loss, opt["code_discriminator"], "code_discriminator")

        return {"eg_loss": eg_loss.detach(), "l1": l1.detach(), "d_loss": d_loss.detach(),
                "c_loss": c_loss.detach(), "gp": gp.detach(), "gp_code": gp_code.detach()}
