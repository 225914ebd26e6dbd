"""The fitted code prior (`sample_prior: fitted`): a per-class Gaussian over the training codes to sample from."""

from __future__ import annotations

import pytest
import torch

from medgen.errors import MedgenError
from medgen.models.blocks import FittedCodePrior
from medgen.models.registry import create_model
from medgen.models.sampling import prior_codes, sample_images


def test_starts_as_the_identity_and_fits_each_class():
    prior = FittedCodePrior(2, 3)
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(prior(z, torch.tensor([0, 1, 0, 1])), z)
    g = torch.Generator().manual_seed(1)
    codes = torch.cat([torch.randn(400, 3, generator=g) * 0.1 + 5.0, torch.randn(400, 3, generator=g) * 2.0 - 1.0])
    labels = torch.tensor([0] * 400 + [1] * 400)
    prior.fit(codes, labels)
    draws = prior(torch.randn(2000, 3, generator=g), torch.tensor([0] * 1000 + [1] * 1000))
    torch.testing.assert_close(draws[:1000].mean(0), torch.full((3,), 5.0), atol=0.02, rtol=0)
    torch.testing.assert_close(draws[:1000].std(0), torch.full((3,), 0.1), atol=0.02, rtol=0)
    torch.testing.assert_close(prior.loc[1], codes[400:].mean(0))  # each class's own mean
    torch.testing.assert_close(draws[1000:].std(0), torch.full((3,), 2.0), atol=0.25, rtol=0)
    soft = torch.tensor([[1.0, 0.0]])
    torch.testing.assert_close(prior(z[:1], soft), prior(z[:1], torch.tensor([0])))


def test_a_class_with_too_few_codes_keeps_its_gaussian():
    prior = FittedCodePrior(2, 2)
    prior.fit(torch.randn(5, 2) + 3, torch.tensor([0, 0, 0, 0, 1]))
    torch.testing.assert_close(prior.loc[1], torch.zeros(2))
    torch.testing.assert_close(prior.tril[1], torch.eye(2))


def test_sampling_maps_the_draws_and_reconstruction_does_not():
    torch.manual_seed(0)
    model = create_model("vae", spatial_dims=3, image_size=16, base_width=4, latent_dim=4, sample_prior="fitted").eval()
    with torch.no_grad():
        model.code_prior.loc.fill_(3.0)
    z = torch.zeros(2, 4)
    torch.testing.assert_close(prior_codes(model, z, [0, 1]), torch.full((2, 4), 3.0))
    with torch.no_grad():
        want = model.sample(torch.full((1, 4), 3.0), torch.tensor([1])).clamp(-1, 1)
    got = sample_images(model, [1], seed=0)
    zs = torch.randn(1, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(got, model.sample(zs + 3.0, torch.tensor([1])).clamp(-1, 1))
    assert not torch.allclose(got, sample_images(create_model("vae", spatial_dims=3, image_size=16, base_width=4,
                                                                latent_dim=4).eval(), [1], seed=0))
    assert want.shape == got.shape
    x = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    with torch.no_grad():
        out = model(x, torch.tensor([0, 1]))
        torch.testing.assert_close(out.recon, model.sample(out.mu, torch.tensor([0, 1])))  # codes decode as they are


def test_unknown_sample_prior_is_refused():
    with pytest.raises(MedgenError, match="sample_prior"):
        create_model("alpha-gan", spatial_dims=3, image_size=16, base_width=4, latent_dim=4, sample_prior="flow")


@pytest.mark.parametrize("name", ["vae", "alpha-gan"])
def test_training_fits_the_prior_to_the_codes(tiny_fit, name):
    state = tiny_fit(name, base_width=4, latent_dim=8, sample_prior="fitted")
    loc, tril = state["code_prior.loc"], state["code_prior.tril"]
    assert loc.abs().sum() > 0 and not torch.allclose(tril, torch.eye(8).expand_as(tril))
    assert torch.isfinite(loc).all() and torch.isfinite(tril).all()
