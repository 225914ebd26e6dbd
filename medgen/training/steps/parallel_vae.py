"""Training step of the parallel-decoder VAE: reconstruction + scheduled, per-decoder KL (DESIGN.md section 6).

    loss = R + g(t) * sum_k (m * KL_k / n) ** e + h(t) * mean_pixels H(w)

R, the reconstruction term per input element, is one of (`likelihood`):
- "mse": mean((recon - x)^2), the error of the weighted sum recon = sum_k w_k image_k;
- "mixture": -1/n sum_pixels log sum_k w_k N(x; image_k, sigma^2 I), a mixture likelihood with one fixed
  sigma per component (MONet, IODINE), without the constant log(sigma sqrt(2 pi)) so that a perfect fit
  scores 0. Each pixel is explained by one decoder rather than blended, so decoders are pushed to own
  regions: a blend of two wrong images no longer fits a pixel.

with n the number of input elements (C * prod(S)), KL_k the KL divergence of decoder k's posterior
(summed over its latent dims, averaged over the batch), g(t) a linear schedule from `kl_start` to
`kl_end` over the run, m the individual multiplier and e the individual exponent. Both terms are per
input element, so the weights transfer between 128^2 x 3 scenes and 64^3 volumes. An exponent > 1
penalises one decoder holding much information more than several holding a little, which pushes the
decoders to share the scene; an exponent < 1 does the opposite (each decoder in use costs about the same
whatever it holds, so an unused one is pushed to the prior instead of taking part of an object; on the
scenes it left more objects merged and scored lower). (Reference settings that summed raw KL, g_ref, convert
as g = g_ref * n**e.)

The last term (`mask_entropy` h > 0; off by default) is the entropy of each pixel's decoder weights w, averaged
over the pixels: it pushes every pixel to one decoder. The weighted-sum MSE is blind to blends, and on the
scenes a quarter of the object pixels were shared between decoders (max weight < 0.6) and an eighth went to
decoders that own no region (split objects). h starts at 0 at a fraction `mask_entropy_start` of the run and ramps
in linearly over the next tenth: from the start, hard masks would freeze the decoders' first, arbitrary
regions before the slots have bound to objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from medgen.errors import MedgenError
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


LIKELIHOODS = ("mse", "mixture")
KL_EPS = 1e-5  # per-element KL shift of a concave exponent (about 0.1 nat on a 64x64 RGB image)


def kl_multiplier(kl_start: float, kl_end: float, iteration: int, total_iterations: int, ramp: float = 1.0) -> float:
    """Linear schedule from kl_start (iteration 0) to kl_end, reached after a fraction `ramp` of the run."""
    frac = min(max(iteration / max(ramp * (total_iterations - 1), 1), 0.0), 1.0)
    return kl_start + (kl_end - kl_start) * frac


def mixture_nll(x: torch.Tensor, images: torch.Tensor, logits: torch.Tensor, sigma: float) -> torch.Tensor:
    """-1/n sum_pixels log sum_k w_k N(x; image_k, sigma^2 I), averaged over the batch (constant dropped).

    Args:
        x: images [B, C, *S].
        images: per-decoder images [B, K, C, *S].
        logits: confidence logits [B, K, 1, *S] (w = softmax over K).
        sigma: the fixed standard deviation of every component.
    Returns:
        Scalar, per input element (n = C * prod(S)).
    """
    log_w = torch.log_softmax(logits, dim=1)[:, :, 0]  # [B, K, *S]
    log_n = -0.5 * ((x.unsqueeze(1) - images) / sigma).pow(2).sum(dim=2)  # [B, K, *S], summed over channels
    log_p = torch.logsumexp(log_w + log_n, dim=1)  # [B, *S]
    return -log_p.sum() / x.numel()


def mask_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Mean over images and pixels of the entropy (nats) of the decoder weights.

    Args:
        weights: decoder weights [B, K, 1, *S] (softmax over K).
    """
    w = weights.float()
    return -(w * torch.log(w.clamp_min(1e-12))).sum(dim=1).mean()


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
    scaled = (individual_multiplier * kl / elements).clamp_min(0)
    if individual_exponent < 1:  # concave: shifted so that the gradient at an unused decoder (KL 0) stays finite
        return multiplier * ((scaled + KL_EPS).pow(individual_exponent) - KL_EPS**individual_exponent).sum()
    return multiplier * scaled.pow(individual_exponent).sum()


@register_step(ParallelVAE)
@dataclass
class ParallelVAEStep(Step):
    """Hyper-parameters (config `steps.parallel-vae`).

    Attributes:
        kl_start: global KL multiplier at the first iteration.
        kl_end: global KL multiplier at the last iteration (linear in between).
        individual_multiplier: m, scales each decoder's per-element KL before the exponent.
        individual_exponent: e, exponent on each decoder's scaled KL (1: plain beta-VAE).
        kl_ramp: fraction of the run over which the global multiplier goes from kl_start to kl_end (then flat).
        likelihood: "mse" (of the weighted reconstruction) or "mixture" (per-pixel mixture of decoders).
        sigma: the fixed per-component standard deviation of the mixture likelihood (images in [-1, 1]).
        beta1: Adam beta1.
        beta2: Adam beta2.
        lr_warmup: iterations over which the learning rate rises linearly from ~0 to train.lr (0: none);
            attention encoders are unstable at the full rate from the first step.
        lr_final: learning rate at the last planned iteration as a fraction of train.lr, reached by a cosine
            from the end of the warm-up (1: constant). A falling rate lets the masks settle at the end of a
            run instead of moving with every batch.
        mask_entropy: h, weight of the mean per-pixel entropy of the decoder weights (0: off).
        mask_entropy_start: fraction of the planned run at which h starts to ramp in (over the next 0.1).
    """

    kl_start: float = 0.0
    kl_end: float = 1.0
    individual_multiplier: float = 100.0
    individual_exponent: float = 2.0
    kl_ramp: float = 1.0
    likelihood: str = "mse"
    sigma: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.999
    lr_warmup: int = 0
    lr_final: float = 1.0
    mask_entropy: float = 0.0
    mask_entropy_start: float = 0.5

    def __post_init__(self) -> None:
        what = "steps.parallel-vae"
        if self.likelihood not in LIKELIHOODS:
            raise MedgenError(f"{what}: likelihood must be one of {', '.join(LIKELIHOODS)}, got {self.likelihood!r}")
        if not self.sigma > 0:
            raise MedgenError(f"{what}: sigma must be > 0, got {self.sigma}")
        if self.lr_warmup < 0:
            raise MedgenError(f"{what}: lr_warmup must be >= 0, got {self.lr_warmup}")
        if not 0 < self.lr_final <= 1:
            raise MedgenError(f"{what}: lr_final must be in (0, 1], got {self.lr_final}")
        if not self.individual_exponent > 0:
            raise MedgenError(f"{what}: individual_exponent must be > 0, got {self.individual_exponent}")
        if self.mask_entropy < 0:
            raise MedgenError(f"{what}: mask_entropy must be >= 0, got {self.mask_entropy}")
        if not 0 <= self.mask_entropy_start < 1:
            raise MedgenError(f"{what}: mask_entropy_start must be in [0, 1), got {self.mask_entropy_start}")
        if not 0 < self.kl_ramp <= 1:
            raise MedgenError(f"{what}: kl_ramp must be in (0, 1], got {self.kl_ramp}")

    def optimizers(self, model: nn.Module, lr: float) -> dict[str, torch.optim.Optimizer]:
        opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(self.beta1, self.beta2))
        for group in opt.param_groups:
            group["base_lr"] = lr
        return {"vae": opt}

    def lr_factor(self, iteration: int, total: int) -> float:
        """Learning rate / train.lr at a 0-based iteration of a run planned for `total`: linear warm-up, then a
        cosine from 1 down to lr_final at the last iteration."""
        if self.lr_warmup and iteration < self.lr_warmup:
            return (iteration + 1) / self.lr_warmup
        span = total - 1 - self.lr_warmup
        t = min(1.0, (iteration - self.lr_warmup) / span) if span > 0 else 1.0
        return self.lr_final + (1.0 - self.lr_final) * 0.5 * (1.0 + math.cos(math.pi * t))

    def __call__(self, model: nn.Module, batch: Batch, opt: dict[str, torch.optim.Optimizer],
                 ctx: StepContext) -> dict[str, torch.Tensor]:
        x = batch.images
        if self.lr_warmup or self.lr_final < 1:
            for group in opt["vae"].param_groups:
                group["lr"] = group["base_lr"] * self.lr_factor(ctx.iteration, ctx.total_iterations)
        noise = ctx.randn(x.shape[0], model.num_decoders, model.latent_per_decoder, device=x.device)
        shape = model.slot_noise_shape
        slot_noise = None if shape is None else ctx.randn(x.shape[0], *shape, device=x.device)
        with ctx.precision.autocast():
            out = model(x, batch.labels, noise=noise, slot_noise=slot_noise)
        if self.likelihood == "mixture":
            recon = mixture_nll(x.float(), out.images.float(), out.logits.float(), self.sigma)
        else:
            recon = torch.mean((out.recon.float() - x.float()) ** 2)
        kl = kl_per_decoder(out.mu.float(), out.logvar.float())
        g = kl_multiplier(self.kl_start, self.kl_end, ctx.iteration, ctx.total_iterations, self.kl_ramp)
        kl_loss = kl_term(kl, elements=x[0].numel(), multiplier=g, individual_multiplier=self.individual_multiplier,
                          individual_exponent=self.individual_exponent)
        loss = recon + kl_loss
        logs = {}
        if self.mask_entropy:
            since = ctx.iteration - int(self.mask_entropy_start * ctx.total_iterations)
            h = kl_multiplier(0.0, self.mask_entropy, since, ctx.total_iterations, ramp=0.1)  # 0, then linear over a tenth
            entropy = mask_entropy(out.weights)
            loss = loss + h * entropy
            logs = {"mask_entropy": entropy.detach(), "entropy_mult": torch.tensor(h)}
        ctx.backward_step(loss, opt["vae"], "vae")
        return {"loss": loss.detach(), "recon": recon.detach(), "kl": kl.sum().detach(),
                "kl_term": kl_loss.detach(), "kl_mult": torch.tensor(g), **logs}
