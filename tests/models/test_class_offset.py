"""The generators' class offset: a learned full-resolution map per class added before the output tanh."""

from __future__ import annotations

import pytest
import torch

from medgen.errors import MedgenError
from medgen.models.networks import Generator
from medgen.models.registry import create_model
from medgen.training.steps.vae import VAEStep


def _generator(**kw):
    torch.manual_seed(0)
    return Generator(spatial_dims=3, in_channels=1, num_classes=3, image_size=16, base_width=4, latent_dim=8,
                     **kw).eval()


def test_offset_starts_at_zero_and_adds_per_class_maps():
    plain, offset = _generator(), _generator(class_offset=True)
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(3)
    torch.testing.assert_close(offset(z, y), plain(z, y))  # zero at the start: the same function
    with torch.no_grad():
        offset.offset.weight.copy_(torch.randn(3, 16**3, generator=torch.Generator().manual_seed(2)))
    pre = torch.atanh(plain(z, y).clamp(-0.999999, 0.999999).double())
    want = torch.tanh(pre + offset.offset.weight.double().view(3, 1, 16, 16, 16))
    torch.testing.assert_close(offset(z, y).double(), want, atol=1e-4, rtol=1e-4)
    soft = torch.nn.functional.one_hot(y, 3).float()
    torch.testing.assert_close(offset(z, soft), offset(z, y))  # class weights give the same as indices


def test_offset_needs_classes():
    with pytest.raises(MedgenError, match="class_offset"):
        Generator(spatial_dims=3, num_classes=0, image_size=16, base_width=4, latent_dim=8, class_offset=True)


def test_vae_offset_learns_where_the_classes_differ():
    """Two classes that differ in one corner only: the offset maps move apart there, not elsewhere."""
    torch.manual_seed(0)
    m = create_model("vae", spatial_dims=3, num_classes=2, image_size=16, base_width=4, latent_dim=8,
                     class_offset=True).train()
    opt = VAEStep(beta=1.0).optimizers(m, 1e-2)
    x = torch.rand(8, 1, 16, 16, 16, generator=torch.Generator().manual_seed(3)) * 0.2 - 0.5
    y = torch.tensor([0, 1] * 4)
    x[y == 1, :, :4, :4, :4] += 0.8
    for _ in range(40):
        out = m(x, y)
        loss = (out.recon - x).abs().mean()
        opt["vae"].zero_grad()
        loss.backward()
        opt["vae"].step()
    gap = (m.decoder.offset.weight[1] - m.decoder.offset.weight[0]).view(16, 16, 16)
    assert gap[:4, :4, :4].mean() > 3 * gap[8:, 8:, 8:].abs().mean(), (gap[:4, :4, :4].mean(), gap[8:].abs().mean())


@pytest.mark.parametrize("name", ["gan", "alpha-gan"])
def test_gan_steps_train_the_offset(tiny_fit, name):
    extra = dict(code_hidden=16) if name == "alpha-gan" else {}
    w = tiny_fit(name, base_width=4, latent_dim=8, class_offset=True, **extra)["generator.offset.weight"]
    assert torch.isfinite(w).all() and w.abs().sum() > 0  # trained from zero by the generator's optimizer


@pytest.mark.parametrize("name", ["vae", "gan", "alpha-gan"])
def test_exported_sampler_keeps_the_offset(name):
    """The MONAI bundle's traced sampler draws the same per-class volumes as the model."""
    from medgen.pipelines.export import trace_sampler

    torch.manual_seed(0)
    m = create_model(name, spatial_dims=3, image_size=16, base_width=4, latent_dim=8, class_offset=True).eval()
    generator = m.decoder if name == "vae" else m.generator
    with torch.no_grad():
        generator.offset.weight.normal_(generator=torch.Generator().manual_seed(5))
    traced = trace_sampler(m, name, 8, 3)
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(6))
    y = torch.arange(3)
    torch.testing.assert_close(traced(z, y), m.sample(z, y))
    assert not torch.allclose(traced(z, torch.zeros(3, dtype=torch.long)), traced(z, y))  # the class matters
