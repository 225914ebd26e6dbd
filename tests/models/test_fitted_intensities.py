"""The fitted intensity layer (`match_intensities`): samples mapped by rank onto the training volumes' per-class
histogram, with the training volumes' noise level."""

from __future__ import annotations

import pytest
import torch

from medgen.errors import MedgenError
from medgen.models.blocks import FittedIntensities, noise_sd
from medgen.models.registry import create_model
from medgen.models.sampling import reconstruct, sample_images


def brains(n: int, seed: int, shift: float = 0.0, noise: float = 0.05) -> torch.Tensor:
    """n 16^3 'brain-extracted' volumes: background -1 outside a ball of varying radius, a smooth gradient plus
    white noise of sd `noise` inside; [n, 1, 16, 16, 16]."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(16.0) - 7.5] * 3, indexing="ij"))
    r = grid.norm(dim=0)
    out = []
    for _ in range(n):
        radius = 5.5 + torch.rand((), generator=g)
        inside = (grid[0] / 8 * 0.4 + shift + noise * torch.randn(16, 16, 16, generator=g)).clamp(-0.8, 1)
        out.append(torch.where(r < radius, inside, torch.tensor(-1.0)))
    return torch.stack(out)[:, None]


def test_identity_before_fit_then_the_class_histogram_in_the_same_voxel_order():
    layer = FittedIntensities(2, num_quantiles=256)
    x = brains(2, 0)
    torch.testing.assert_close(layer(x, torch.tensor([0, 1])), x)  # not fitted: the identity
    real = torch.cat([brains(20, 1, shift=-0.3), brains(20, 2, shift=0.3)])
    layer.fit(real, torch.tensor([0] * 20 + [1] * 20))
    assert float(layer.background) == -1.0 and -1.0 < float(layer.threshold) < -0.5  # halfway to the darkest
    # a blurry, noiseless sample with a soft edge, between the two classes
    soft = torch.nn.functional.avg_pool3d(brains(1, 3, shift=0.0, noise=0.0), 3, stride=1, padding=1,
                                          count_include_pad=False)
    for k, shift in enumerate((-0.3, 0.3)):
        out = layer(soft, torch.tensor([k]))
        fg = out[out > -1]
        assert abs(float(fg.mean()) - shift) < 0.05  # the class's foreground intensities
        assert set(torch.unique(out[out <= float(layer.threshold)]).tolist()) == {-1.0}  # a sharp background
        assert abs(float(noise_sd(out, float(layer.threshold))) - 0.05) < 0.02  # the training noise level
        inside = (soft > float(layer.threshold)) & (out > -1)
        # the anatomy stays: the voxel order (rank correlation with the input) survives, up to the added noise
        ranks = torch.stack([soft[inside].argsort().argsort(), out[inside].argsort().argsort()]).float()
        assert torch.corrcoef(ranks)[0, 1] > 0.8
    again = layer(soft, torch.tensor([0]))
    torch.testing.assert_close(again, layer(soft, torch.tensor([0])))  # deterministic for the same image
    torch.testing.assert_close(layer(soft, torch.tensor([[1.0, 0.0]])), again)  # soft labels: one-hot = hard


def test_sample_histograms_vary_as_much_as_the_training_volumes():
    g = torch.Generator().manual_seed(0)
    shifts = 0.15 * torch.randn(40, generator=g)  # each training volume its own brightness
    real = torch.cat([brains(1, 10 + i, shift=float(s)) for i, s in enumerate(shifts)])
    labels = torch.zeros(40, dtype=torch.long)
    samples = torch.cat([brains(1, 100 + i, noise=0.0) for i in range(30)])  # alike, bar their radius
    spread = {}
    for rank in (0, 4):
        layer = FittedIntensities(1, num_quantiles=256, rank=rank)
        layer.fit(real, labels)
        out = layer(samples, torch.zeros(30, dtype=torch.long))
        means = torch.stack([v[v > -1].mean() for v in out])
        spread[rank] = float(means.std())
    real_spread = float(torch.stack([v[v > -1].mean() for v in real]).std())
    assert spread[0] < 0.3 * real_spread  # the class mean for every sample
    assert 0.6 * real_spread < spread[4] < 1.5 * real_spread  # drawn: as varied as the training volumes


def test_the_generators_speckle_is_replaced_by_the_training_noise():
    real = brains(12, 1)  # white noise of sd 0.05 inside
    idx = torch.stack(torch.meshgrid(*[torch.arange(16)] * 3, indexing="ij")).sum(0)
    checker = (idx % 2 * 2 - 1).float()  # [16, 16, 16] of +-1: a transposed-convolution checkerboard
    sample = brains(1, 7, noise=0.0)
    sample = torch.where(sample > -1, sample + 0.2 * checker, sample)
    level = {}
    for smooth in (0.0, 0.6):
        layer = FittedIntensities(1, num_quantiles=256, rank=0, smooth=smooth)
        layer.fit(real, torch.zeros(12, dtype=torch.long))
        level[smooth] = float(noise_sd(layer(sample, torch.tensor([0])), float(layer.threshold)))
    assert level[0.0] > 0.1  # left alone, the speckle outweighs the training noise
    assert 0.025 < level[0.6] < 0.075  # smoothed away first: about the training volumes' noise level (0.05)


def test_the_models_take_the_smoothing_as_a_setting():
    model = create_model("gan", spatial_dims=3, image_size=16, base_width=4, latent_dim=4, match_intensities=True,
                         intensity_smooth=0.6)
    assert model.intensity_prior.smooth == 0.6
    assert create_model("vae", spatial_dims=3, image_size=16, base_width=4, latent_dim=4,
                        match_intensities=True).intensity_prior.smooth == 0.0
    with pytest.raises(MedgenError, match="intensity_smooth"):
        create_model("alpha-gan", spatial_dims=3, image_size=16, base_width=4, latent_dim=4, match_intensities=True,
                     intensity_smooth=-1.0)


def test_a_layer_saved_without_the_variation_loads_as_before():
    layer = FittedIntensities(2, num_quantiles=64)
    layer.fit(torch.cat([brains(6, 1, shift=-0.3), brains(6, 2, shift=0.3)]), torch.tensor([0] * 6 + [1] * 6))
    state = {k: v for k, v in layer.state_dict().items() if k not in ("directions", "spread")}
    old = FittedIntensities(2, num_quantiles=64)
    old.load_state_dict(state)  # strict: the missing buffers are taken as no variation
    assert bool(old.fitted) and float(old.spread.abs().sum()) == 0.0
    torch.testing.assert_close(old.quantiles, layer.quantiles)


def test_volumes_without_background_are_matched_whole():
    layer = FittedIntensities(1, num_quantiles=128)
    g = torch.Generator().manual_seed(0)
    real = torch.rand(8, 1, 8, 8, 8, generator=g) * 0.5
    layer.fit(real, torch.zeros(8, dtype=torch.long))
    assert float(layer.threshold) < float(real.min())  # no voxel is background
    out = layer(torch.randn(1, 1, 8, 8, 8, generator=g), torch.tensor([0]))
    assert 0.0 <= float(out.min()) and float(out.max()) <= 0.5


def test_sampling_matches_and_reconstruction_does_not():
    torch.manual_seed(0)
    model = create_model("vae", spatial_dims=3, image_size=16, base_width=4, latent_dim=4,
                         match_intensities=True).eval()
    plain = sample_images(model, [0, 1], seed=0)  # not fitted yet: the model's own output
    model.intensity_prior.fit(brains(12, 5, shift=0.5), torch.tensor([0, 1, 2] * 4))
    matched = sample_images(model, [0, 1], seed=0)
    assert not torch.allclose(plain, matched)
    assert abs(float(matched[matched > -1].mean()) - 0.5) < 0.05
    x = brains(2, 6)
    with torch.no_grad():
        want = model.sample(model.encode(x, torch.tensor([0, 1]))[0], torch.tensor([0, 1])).clamp(-1, 1)
    torch.testing.assert_close(reconstruct(model, x, [0, 1]), want)  # reconstructions keep their intensities


@pytest.mark.parametrize("name", ["vae", "gan", "alpha-gan"])
def test_training_fits_the_layer_to_the_training_volumes(tiny_fit, name):
    state = tiny_fit(name, base_width=4, latent_dim=8, match_intensities=True)
    assert bool(state["intensity_prior.fitted"])
    q = state["intensity_prior.quantiles"]
    assert torch.isfinite(q).all() and (q[:, 1:] >= q[:, :-1]).all()  # quantile functions: non-decreasing
    assert torch.isfinite(state["intensity_prior.log_noise"]).all()
    assert torch.isfinite(state["intensity_prior.directions"]).all() and (state["intensity_prior.spread"] >= 0).all()


def test_the_detail_gain_restores_the_training_volumes_edge_detail():
    real = torch.cat([brains(1, 20 + i, noise=0.0) + 0.0 for i in range(12)])
    # sharp structure inside: a stripe pattern on top of the gradient, as tissue edges
    stripes = (torch.arange(16.0) // 2 % 2 * 0.3)[None, None, :, None, None].expand_as(real)
    real = torch.where(real > -1, (real + stripes).clamp(-0.8, 1), real)
    labels = torch.zeros(12, dtype=torch.long)
    layer = FittedIntensities(1, num_quantiles=256, rank=0, sharpen=True)
    layer.fit(real, labels)
    threshold = float(layer.threshold)
    blurred = FittedIntensities(1, smooth=0.5).smoothed(real, threshold)  # the same, smoother inside
    assert float(layer.detail_energy(blurred, threshold).mean()) < 0.7 * float(layer.detail_target)
    gain = layer.fit_gain(blurred, labels)
    assert 0 < gain <= FittedIntensities.MAX_GAIN
    energy = float(layer.detail_energy(layer(blurred, labels), threshold).mean())
    assert abs(energy - float(layer.detail_target)) < 0.02 * float(layer.detail_target)
    # samples with more detail than the training volumes get none added
    noisy = torch.where(real > -1, real + 0.2 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0)),
                        real)
    assert layer.fit_gain(noisy, labels) == 0.0 and float(layer.gain) == 0.0


def test_the_detail_gain_is_a_setting_that_needs_matching_and_old_layers_load_without_it():
    model = create_model("alpha-gan", spatial_dims=3, image_size=16, base_width=4, latent_dim=4,
                         match_intensities=True, intensity_sharpen=True)
    assert model.intensity_prior.sharpen and float(model.intensity_prior.gain) == 0.0
    with pytest.raises(MedgenError, match="intensity_sharpen"):
        create_model("vae", spatial_dims=3, image_size=16, base_width=4, latent_dim=4, intensity_sharpen=True)
    layer = FittedIntensities(1, num_quantiles=64)
    layer.fit(brains(6, 1), torch.zeros(6, dtype=torch.long))
    state = {k: v for k, v in layer.state_dict().items() if k not in ("gain", "detail_target")}
    old = FittedIntensities(1, num_quantiles=64, sharpen=True)
    old.load_state_dict(state)  # strict: no gain saved -> none added
    x = brains(1, 3, noise=0.0)
    torch.testing.assert_close(old(x, torch.tensor([0])), layer(x, torch.tensor([0])))


@pytest.mark.parametrize("name", ["gan", "alpha-gan"])
def test_training_fits_the_detail_gain(tiny_fit, name):
    state = tiny_fit(name, base_width=4, latent_dim=8, match_intensities=True, intensity_sharpen=True)
    assert float(state["intensity_prior.detail_target"]) > 0  # the random training volumes' detail
    gain = float(state["intensity_prior.gain"])
    assert 0.0 <= gain <= FittedIntensities.MAX_GAIN and torch.isfinite(state["intensity_prior.gain"])


def test_sharpening_keeps_the_brain_extent():
    grid = torch.stack(torch.meshgrid(*[torch.arange(16.0) - 7.5] * 3, indexing="ij")).norm(dim=0)
    # a dark rim (CSF-like) around a bright inside: sharpened, the rim would fall below the background threshold
    brain = torch.where(grid < 5.0, torch.tensor(0.3), torch.where(grid < 6.5, torch.tensor(-0.7), torch.tensor(-1.0)))
    x = brain.expand(4, 1, 16, 16, 16).clone()
    labels = torch.zeros(4, dtype=torch.long)
    layer = FittedIntensities(1, num_quantiles=128, rank=0, sharpen=True)
    layer.fit(x, labels)
    threshold = float(layer.threshold)
    detail = layer.detail(x, threshold)
    assert bool(((x > threshold) & (x + FittedIntensities.MAX_GAIN * detail <= threshold)).any())  # would cross
    layer.gain.fill_(FittedIntensities.MAX_GAIN)
    torch.testing.assert_close(layer(x, labels) <= threshold, x <= threshold)  # it does not
