"""The class prior of the vae and alpha-gan: p(z | y) = N(m_y, I), standardised codes."""

from __future__ import annotations

import torch

from medgen.models.registry import create_model
from medgen.training.steps.vae import VAEStep


def _vae(**kw):
    torch.manual_seed(0)
    return create_model("vae", spatial_dims=3, image_size=16, base_width=4, latent_dim=8, **kw).eval()


def test_class_prior_keeps_the_class_centroid_in_the_decoder_input():
    m = _vae(class_prior=True)
    with torch.no_grad():
        m.prior.weight.copy_(torch.randn(3, 8, generator=torch.Generator().manual_seed(1)))
    x = torch.rand(4, 1, 16, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    y = torch.tensor([0, 1, 2, 0])
    mu, _ = m.encode(x, y)
    raw, _ = m.encode(x, torch.zeros(4, dtype=torch.long))
    # the encoder does not see the class: codes differ by the prior means only
    torch.testing.assert_close(mu - raw, -(m.prior.weight[y] - m.prior.weight[0]))
    torch.testing.assert_close(m(x, y).recon, m.sample(mu, y))  # eval forward decodes the posterior mean
    eps = torch.zeros(3, 8)
    a = m.sample(eps, torch.arange(3))  # prior samples at each class's mean
    b = m.decoder(m.prior.weight.detach(), torch.arange(3))
    torch.testing.assert_close(a, b)
    soft = torch.nn.functional.one_hot(torch.arange(3), 3).float()
    torch.testing.assert_close(m.sample(eps, soft), a)  # class weights give the same as indices


def test_class_prior_means_learn_the_class_centroids():
    """Two classes whose images differ by a constant: a few steps move the prior means apart."""
    m = _vae(class_prior=True, num_classes=2).train()
    step = VAEStep(beta=1.0)
    opt = step.optimizers(m, 1e-2)
    x = torch.rand(8, 1, 16, 16, 16, generator=torch.Generator().manual_seed(3)) * 0.2 - 0.5
    y = torch.tensor([0, 1] * 4)
    x[y == 1] += 0.8
    for _ in range(30):
        mu, logvar = m.encode(x, y)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        loss = (m.sample(z, y) - x).abs().mean() + 0.01 * (-0.5 * (1 + logvar - mu ** 2 - logvar.exp())).mean()
        opt["vae"].zero_grad()
        loss.backward()
        opt["vae"].step()
    gap = (m.prior.weight[1] - m.prior.weight[0]).norm()
    assert gap > 0.05, gap
    assert _vae().prior is None  # off by default: old checkpoints load


def test_alpha_gan_class_prior_standardises_codes_and_trains_its_means():
    torch.manual_seed(0)
    m = create_model("alpha-gan", spatial_dims=3, image_size=16, base_width=4, latent_dim=8, code_hidden=16,
                     class_prior=True).eval()
    with torch.no_grad():
        m.prior.weight.copy_(torch.randn(3, 8, generator=torch.Generator().manual_seed(1)))
    x = torch.rand(4, 1, 16, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    y = torch.tensor([0, 1, 2, 0])
    code = m.encode(x, y)
    torch.testing.assert_close(code, m.encoder(x, y) - m.prior.weight[y])
    torch.testing.assert_close(m(x, y).recon, m.generator(m.encoder(x, y), y))  # G(E(x)) unchanged
    torch.testing.assert_close(m.sample(torch.zeros(3, 8), torch.arange(3)),
                               m.generator(m.prior.weight.detach(), torch.arange(3)))
    assert create_model("alpha-gan", spatial_dims=3, image_size=16, base_width=4, latent_dim=8).prior is None


def test_alpha_gan_step_moves_the_prior_means(tiny_fit):
    w = tiny_fit("alpha-gan", base_width=4, latent_dim=8, code_hidden=16, class_prior=True)["prior.weight"]
    assert torch.isfinite(w).all() and w.abs().sum() > 0  # trained from zero by the encoder-generator optimizer
