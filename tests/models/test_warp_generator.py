"""The generators' warp output: a learned template, deformed and contrast-adjusted by low-resolution fields."""

from __future__ import annotations

import pytest
import torch

from medgen.errors import MedgenError
from medgen.models.networks import TEMPLATE_GAIN, Generator, identity_grid


def _generator(spatial_dims: int = 3, **kw) -> Generator:
    torch.manual_seed(0)
    return Generator(spatial_dims=spatial_dims, in_channels=1, num_classes=3, image_size=16, base_width=4,
                     latent_dim=8, output="warp", **kw).eval()


def _random_template(g: Generator) -> torch.Tensor:
    with torch.no_grad():
        g.template.copy_(torch.randn(g.template.shape, generator=torch.Generator().manual_seed(3)) / TEMPLATE_GAIN)
    return torch.tanh(TEMPLATE_GAIN * g.template.detach())


@pytest.mark.parametrize("dims", [2, 3])
def test_zero_fields_give_the_template_for_every_code(dims):
    g = _generator(dims)
    want = _random_template(g)
    with torch.no_grad():
        g.stages[-1][-1].conv.weight.zero_()
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    out = g(z, torch.arange(3))
    assert out.shape == (3, 1) + (16,) * dims
    for i in range(3):  # a zero last stage: identity warp, unit gain, no bias
        torch.testing.assert_close(out[i : i + 1], want, atol=1e-5, rtol=1e-5)


def test_a_constant_displacement_shifts_the_template():
    g = _generator()
    template = _random_template(g)
    fields = torch.zeros(1, 5, 8, 8, 8)
    step = 2.0 / 15  # one voxel in align_corners=True coordinates
    # displacement channel 0 moves grid_sample's x, the last axis; the fields pass a tanh and max_displacement
    fields[:, 0] = torch.atanh(torch.tensor(step / g.max_displacement))
    out = torch.tanh(g.warp(fields))
    torch.testing.assert_close(out[..., :-1], template[..., 1:], atol=1e-4, rtol=1e-4)


def test_gain_and_bias_fields_adjust_the_contrast():
    g = _generator()
    _random_template(g)
    fields = torch.zeros(1, 5, 8, 8, 8)
    fields[:, 3], fields[:, 4] = torch.log(torch.tensor(2.0)), 0.5
    base = g.warp(torch.zeros(1, 5, 8, 8, 8))
    torch.testing.assert_close(g.warp(fields), 2 * base + 0.5)


def test_identity_grid_is_what_grid_sample_reproduces():
    x = torch.randn(1, 1, 5, 6, 6)[..., :5, :5]  # any cube
    out = torch.nn.functional.grid_sample(x, identity_grid(3, 5), align_corners=True)
    torch.testing.assert_close(out, x)


def test_training_reaches_template_and_stages():
    g = _generator().train()
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    loss = (g(z, torch.arange(4) % 3) - 0.3).abs().mean()
    loss.backward()
    assert g.template.grad.abs().sum() > 0
    assert g.stages[-1][-1].conv.weight.grad.abs().sum() > 0
    assert g.stages[0][-1].conv.weight.grad.abs().sum() > 0  # the first stage too: the codes are not ignored


@pytest.mark.parametrize("kw, match", [(dict(warp_size=4), "warp_size"), (dict(warp_size=16), "warp_size"),
                                       (dict(warp_size=12), "warp_size"), (dict(max_displacement=0.0), "max_disp"),
                                       (dict(output="voxels"), "output")])
def test_bad_warp_arguments_are_refused(kw, match):
    with pytest.raises(MedgenError, match=match):
        Generator(spatial_dims=3, num_classes=3, image_size=16, base_width=4, latent_dim=8,
                  **({"output": "warp"} | kw))


@pytest.mark.parametrize("name", ["vae", "gan", "alpha-gan"])
def test_models_train_with_the_warp_output(tiny_fit, name):
    state = tiny_fit(name, base_width=4, latent_dim=8, generator_output="warp", warp_size=8)
    key = next(k for k in state if k.endswith("template"))
    assert torch.isfinite(state[key]).all() and state[key].abs().sum() > 0  # moved from its zero start


def test_observation_noise_is_zero_on_the_background_and_learned():
    g = Generator(spatial_dims=3, num_classes=3, image_size=16, base_width=4, latent_dim=8, noise=True)
    assert g.observation_noise
    images = torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 3, 1, 1)
    eps = torch.ones_like(images)
    sigma = g.log_noise.exp().item()
    torch.testing.assert_close(g.add_noise(images, eps), images + sigma * torch.tensor([0.0, 0.5, 1.0]).view_as(images))
    z = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    noisy = g(z, torch.arange(2), noise=torch.randn(2, 1, 16, 16, 16))
    noisy.pow(2).mean().backward()
    assert g.log_noise.grad is not None and g.log_noise.grad != 0
    assert not Generator(spatial_dims=3, num_classes=3, image_size=16, base_width=4, latent_dim=8).observation_noise


def test_sampled_noise_follows_the_latent_not_the_batching():
    from medgen.models.registry import create_model
    from medgen.models.sampling import decode, sample_images

    torch.manual_seed(0)
    model = create_model("gan", image_size=16, base_width=4, latent_dim=8, noise=True, generator_output="warp",
                         warp_size=8)
    a = sample_images(model, [0, 1, 2, 0], seed=5, batch_size=4)
    b = sample_images(model, [0, 1, 2, 0], seed=5, batch_size=1)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    z = torch.randn(2, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mean = model.eval().generator(z, torch.tensor([0, 0])).clamp(-1, 1)
    noisy = decode(model, z, [0, 0])
    assert (noisy - mean).abs().max() > 1e-3  # the volumes carry the noise
    torch.testing.assert_close(decode(model, z, [0, 0]), noisy)  # and the same latent the same noise


def test_vae_noise_follows_the_residual_noise_level():
    from medgen.models.blocks import checkerboard_coefficients
    from medgen.training.steps.vae import fit_noise

    g = Generator(spatial_dims=3, num_classes=3, image_size=16, base_width=4, latent_dim=8, noise=True)
    gen = torch.Generator().manual_seed(0)
    recon = torch.full((4, 1, 16, 16, 16), 0.5)  # noise scale (1 + 0.5) / 2 = 0.75
    smooth = torch.linspace(-0.2, 0.2, 16).view(1, 1, 16, 1, 1)  # a smooth misfit the estimate ignores
    x = recon + smooth + 0.75 * 0.05 * torch.randn(recon.shape, generator=gen)
    for _ in range(200):
        sd = fit_noise(g, recon, x)
    assert abs(float(sd) - 0.05) < 0.005
    assert checkerboard_coefficients(smooth.expand(1, 1, 16, 16, 16), 8**0.5).abs().max() < 1e-5
    background = torch.full_like(recon, -1.0)  # nothing to estimate from: the sd stays
    assert float(fit_noise(g, background, background)) == pytest.approx(float(sd))


def test_vae_trains_with_observation_noise(tiny_fit):
    state = tiny_fit("vae", base_width=4, latent_dim=8, noise=True)
    assert torch.isfinite(state["decoder.log_noise"])


def test_alpha_gan_maps_learn_from_the_reconstruction_alone():
    from types import SimpleNamespace

    from medgen.training.steps.alpha_gan import AlphaGANStep

    g = Generator(spatial_dims=3, num_classes=3, image_size=16, base_width=4, latent_dim=8, output="warp",
                  class_offset=True).train()
    z, y = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)), torch.arange(4) % 3
    target = torch.rand(4, 1, 16, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1

    def terms():
        out = g(z, y)
        return (out - target).abs().mean(), (out[:, :, ::2] * 3.0).mean()  # "L1" and a stand-in critic term

    l1, _ = terms()
    want = torch.autograd.grad(l1, [g.template, g.offset.weight, g.stages[0][-1].conv.weight])
    l1, adv = terms()
    full = torch.autograd.grad(l1 + adv, [g.stages[0][-1].conv.weight])[0]
    l1, adv = terms()
    hooks = AlphaGANStep._reconstruction_only(g, l1, l1, SimpleNamespace(scalers={}))
    (l1 + adv).backward()
    for h in hooks:
        h.remove()
    torch.testing.assert_close(g.template.grad, want[0])
    torch.testing.assert_close(g.offset.weight.grad, want[1])
    torch.testing.assert_close(g.stages[0][-1].conv.weight.grad, full)  # the weights still see every term
    assert not torch.allclose(full, want[2])

    # offset_loss: mse: the offset follows the squared error, the template still the L1 term
    g.zero_grad()
    out = g(z, y)
    l1, mse = (out - target).abs().mean(), ((out - target) ** 2).mean()
    want_offset = torch.autograd.grad(mse, [g.offset.weight], retain_graph=True)[0]
    hooks = AlphaGANStep._reconstruction_only(g, l1, mse, SimpleNamespace(scalers={}))
    (l1 + (out[:, :, ::2] * 3.0).mean()).backward()
    for h in hooks:
        h.remove()
    torch.testing.assert_close(g.template.grad, want[0])
    torch.testing.assert_close(g.offset.weight.grad, want_offset)
    assert not torch.allclose(want_offset, want[1])


def test_alpha_gan_offset_loss_is_checked():
    from medgen.training.steps import create_step

    assert create_step("alpha-gan", maps_from_reconstruction=True, offset_loss="mse").offset_loss == "mse"
    with pytest.raises(MedgenError, match="offset_loss"):
        create_step("alpha-gan", maps_from_reconstruction=True, offset_loss="huber")
    with pytest.raises(MedgenError, match="maps_from_reconstruction"):
        create_step("alpha-gan", offset_loss="mse")
