"""Loss functions of the generative models (pure functions; all reductions in fp32).

Written here because MONAI has no WGAN-GP critic losses or projection-critic gradient penalty; the
reconstruction losses are the torch functional ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from medgen.errors import MedgenError

RECONSTRUCTIONS = ("l1", "mse")


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, *, per_element: bool = True) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)).

    Args:
        mu: posterior means [B, L].
        logvar: posterior log-variances [B, L].
        per_element: mean over batch and latent units (scale comparable to a per-voxel reconstruction
            loss); False: sum over latent units, mean over the batch (the ELBO's KL per sample).
    """
    mu, logvar = mu.float(), logvar.float()
    kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar)
    return kl.mean() if per_element else kl.sum(dim=1).mean()


def reconstruction(recon: torch.Tensor, target: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Per-voxel mean reconstruction error, "l1" (mean absolute) or "mse"."""
    if kind not in RECONSTRUCTIONS:
        raise MedgenError(f"reconstruction loss must be one of {', '.join(RECONSTRUCTIONS)}, got {kind!r}")
    recon, target = recon.float(), target.float()
    return F.l1_loss(recon, target) if kind == "l1" else F.mse_loss(recon, target)


def wgan_critic_loss(real_score: torch.Tensor, fake_score: torch.Tensor) -> torch.Tensor:
    """Critic loss E[D(fake)] - E[D(real)] (minimised; its negative estimates the Wasserstein distance)."""
    return fake_score.float().mean() - real_score.float().mean()


def wgan_generator_loss(fake_score: torch.Tensor) -> torch.Tensor:
    """Generator loss -E[D(fake)]."""
    return -fake_score.float().mean()


def bce_critic_loss(real_logit: torch.Tensor, fake_logit: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN discriminator loss: BCE(real -> 1) + BCE(fake -> 0) on logits."""
    return F.softplus(-real_logit.float()).mean() + F.softplus(fake_logit.float()).mean()


def bce_generator_loss(fake_logit: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: BCE(fake -> 1) on logits."""
    return F.softplus(-fake_logit.float()).mean()


def gradient_penalty(critic: Callable[..., torch.Tensor], real: torch.Tensor, fake: torch.Tensor,
                     labels: torch.Tensor | None = None, *, generator: torch.Generator | None = None,
                     alpha: torch.Tensor | None = None, eps: float = 1e-12) -> torch.Tensor:
    """WGAN-GP penalty E[(||grad_x D(x_hat)||_2 - 1)^2] on random interpolates x_hat (Gulrajani et al. 2017).

    The interpolation, the critic call and the gradient run in fp32 with autocast disabled: a double
    backward through low-precision activations under AMP gives wrong or non-finite penalties. They
    also run eagerly when the critic was compiled (torch.compile has no double backward). The result
    keeps its graph (create_graph=True) so the penalty trains the critic.

    Args:
        critic: callable(x) or callable(x, labels) -> scores [B].
        real: real samples [B, ...] (images or latent codes).
        fake: fake samples, same shape as real (detached here).
        labels: class labels [B] passed to the critic, or None for an unconditional critic.
        generator: source of the interpolation weights when `alpha` is not given.
        alpha: interpolation weights [B] in [0, 1] (e.g. drawn by the training step so data-parallel
            ranks take their share of one global draw); None: uniform draws from `generator`.
        eps: added under the square root so the norm's gradient stays finite at zero.
    """
    # force_eager: a critic compiled with torch.compile runs eagerly here (compiled graphs have no double backward)
    with torch.autocast(device_type=real.device.type, enabled=False), torch.compiler.set_stance("force_eager"):
        real = real.detach().float()
        fake = fake.detach().float()
        if alpha is None:
            alpha = torch.rand(real.shape[0], generator=generator, device=real.device)
        alpha = alpha.float().view((real.shape[0],) + (1,) * (real.ndim - 1))  # [B] -> [B, 1, 1, ...]
        x_hat = torch.lerp(real, fake, alpha).requires_grad_(True)
        score = critic(x_hat) if labels is None else critic(x_hat, labels)
        (grad,) = torch.autograd.grad(score.float().sum(), x_hat, create_graph=True)
        sq = grad.square().sum(dim=tuple(range(1, grad.ndim)))  # [B]
        return (torch.sqrt(sq + eps) - 1.0).square().mean()
