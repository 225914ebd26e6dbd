import numpy as np
import pytest
import torch

from medgen.data import scenes as S
from medgen.errors import MedgenError
from medgen.models import create_model
from medgen.runtime import resolve_precision
from medgen.training.steps import Batch, StepContext, create_step
from medgen.training.steps.parallel_vae import (
    kl_multiplier,
    kl_per_decoder,
    kl_term,
    mask_entropy,
    mixture_nll,
)


@pytest.mark.parametrize("dims", [2, 3])
def test_forward_backward_shapes(dims):
    torch.manual_seed(0)
    model = create_model("parallel-vae", spatial_dims=dims, in_channels=2, image_size=16, num_decoders=3,
                         latent_per_decoder=5, base_width=4)
    x = torch.rand(2, 2, *(16,) * dims) * 2 - 1
    out = model(x, noise=torch.randn(2, 3, 5))
    sp = (16,) * dims
    assert out.recon.shape == (2, 2, *sp)
    assert out.images.shape == (2, 3, 2, *sp)
    assert out.logits.shape == out.weights.shape == (2, 3, 1, *sp)
    assert out.mu.shape == out.logvar.shape == (2, 3, 5)
    assert torch.allclose(out.weights.sum(dim=1), torch.ones(1))
    assert out.recon.abs().max() <= 1
    out.recon.pow(2).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.latent_dim == 15


def test_mean_decode_matches_sample_and_decoders_are_independent():
    torch.manual_seed(0)
    model = create_model("parallel-vae", **create_model("parallel-vae").tiny_kwargs(2)).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = model(x)
    assert torch.allclose(model.sample(out.mu.flatten(1)), out.recon, atol=1e-6)
    # changing decoder 0's latent changes only decoder 0's image (grouped convs share nothing)
    z = out.mu.clone()
    z[:, 0] += 1.0
    _, images, _, _ = model.decode(z)
    assert not torch.allclose(images[:, 0], out.images[:, 0])
    assert torch.allclose(images[:, 1:], out.images[:, 1:], atol=1e-6)


def test_bad_arguments():
    with pytest.raises(MedgenError, match="spatial_dims"):
        create_model("parallel-vae", spatial_dims=1)
    with pytest.raises(MedgenError, match="image_size"):
        create_model("parallel-vae", image_size=20)
    with pytest.raises(MedgenError, match="num_decoders"):
        create_model("parallel-vae", num_decoders=0)


def test_kl_schedule_and_normalisation():
    assert kl_multiplier(0.1, 1.1, 0, 11) == pytest.approx(0.1)
    assert kl_multiplier(0.1, 1.1, 5, 11) == pytest.approx(0.6)
    assert kl_multiplier(0.1, 1.1, 10, 11) == pytest.approx(1.1)
    assert kl_multiplier(0.0, 1.0, 50, 11) == pytest.approx(1.0)
    mu, logvar = torch.zeros(4, 3, 6), torch.zeros(4, 3, 6)
    assert torch.allclose(kl_per_decoder(mu, logvar), torch.zeros(3))
    kl = kl_per_decoder(torch.ones(4, 3, 6), logvar)
    assert torch.allclose(kl, torch.full((3,), 3.0))  # 0.5 * 6 dims * 1^2
    # per element: twice the elements holding twice the KL give the same term (128^2x3 vs 64^3 transfer)
    a = kl_term(kl, elements=1000, multiplier=0.5, individual_multiplier=10, individual_exponent=2)
    b = kl_term(2 * kl, elements=2000, multiplier=0.5, individual_multiplier=10, individual_exponent=2)
    assert a == pytest.approx(b.item())
    assert a.item() == pytest.approx(0.5 * 3 * (10 * 3 / 1000) ** 2)
    # exponent > 1 prefers spreading information: equal split costs less than one decoder holding all
    spread = kl_term(torch.tensor([2.0, 2.0]), elements=1, multiplier=1, individual_multiplier=1, individual_exponent=2)
    one = kl_term(torch.tensor([4.0, 0.0]), elements=1, multiplier=1, individual_multiplier=1, individual_exponent=2)
    assert spread < one


def _tiny_scenes(n=8, size=32):
    imgs = []
    for i in range(n):
        r = S.render(S.sample_scene(S.scene_rng(0, "train", i)), size=size)
        imgs.append(torch.from_numpy(r.image).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(imgs)


def _run_steps(model, step, x, *, lr, iterations):
    """Train on x for `iterations` steps (fp32, seeded); per step: the step's outputs as floats, and the lr."""
    opt = step.optimizers(model, lr)
    ctx = StepContext(precision=resolve_precision("fp32", torch.device("cpu")),
                      generator=torch.Generator().manual_seed(0), total_iterations=iterations)
    batch = Batch(images=x, labels=torch.zeros(len(x), dtype=torch.int64))
    history = []
    for it in range(iterations):
        ctx.iteration = it
        out = step(model, batch, opt, ctx)
        history.append({**{k: float(v) for k, v in out.items()}, "lr": opt["vae"].param_groups[0]["lr"]})
    return history


def test_short_training_run_loss_decreases():
    torch.manual_seed(0)
    x = _tiny_scenes(n=6)
    model = create_model("parallel-vae", spatial_dims=2, in_channels=3, image_size=32, num_decoders=3,
                         latent_per_decoder=8, base_width=4)
    step = create_step("parallel-vae", kl_start=0.0, kl_end=0.01)
    history = _run_steps(model, step, x, lr=2e-3, iterations=30)
    assert all(set(h) >= {"loss", "recon", "kl", "kl_term"} for h in history)
    losses = [h["loss"] for h in history]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])


def test_step_rejects_unknown_key():
    with pytest.raises(MedgenError, match="kl_strat"):
        create_step("parallel-vae", kl_strat=1.0)


BROADCAST = dict(decoder="broadcast", decoder_width=6, decoder_layers=2)


@pytest.mark.parametrize(("dims", "grid"), [(2, 8), (2, 16), (3, 8)])
def test_broadcast_decoder_shapes_weights_and_independence(dims, grid):
    torch.manual_seed(0)
    model = create_model("parallel-vae", spatial_dims=dims, in_channels=2, image_size=16, num_decoders=3,
                         latent_per_decoder=4, base_width=4, broadcast_size=grid, **BROADCAST).eval()
    sp = (16,) * dims
    x = torch.rand(2, 2, *sp) * 2 - 1
    out = model(x)
    assert out.images.shape == (2, 3, 2, *sp)
    assert out.weights.shape == (2, 3, 1, *sp)
    assert torch.allclose(out.weights.sum(dim=1), torch.ones(1), atol=1e-6)
    assert torch.isfinite(out.recon).all()
    # grouped convs: decoder 1's latent moves decoder 1's image and nobody else's
    z = out.mu.clone()
    z[:, 1] += 2.0
    _, images, _, _ = model.decode(z)
    assert not torch.allclose(images[:, 1], out.images[:, 1])
    assert torch.allclose(images[:, [0, 2]], out.images[:, [0, 2]], atol=1e-6)


def test_broadcast_decoder_reads_the_coordinates():
    # the same latent everywhere on the grid: without the coordinate channels every pixel would be equal
    torch.manual_seed(0)
    model = create_model("parallel-vae", spatial_dims=2, in_channels=3, image_size=16, num_decoders=2,
                         latent_per_decoder=4, base_width=4, **BROADCAST).eval()
    _, images, logits, _ = model.decode(torch.zeros(1, 2, 4))
    assert images[0, 0].flatten(1).std(dim=1).min() > 1e-4
    assert logits[0, 0].std() > 1e-4


def test_broadcast_bad_arguments():
    with pytest.raises(MedgenError, match="decoder must be one of"):
        create_model("parallel-vae", decoder="slots")
    with pytest.raises(MedgenError, match="broadcast_size"):
        create_model("parallel-vae", image_size=16, decoder="broadcast", broadcast_size=12)
    with pytest.raises(MedgenError, match="broadcast_size"):
        create_model("parallel-vae", image_size=16, decoder="broadcast", broadcast_size=32)
    with pytest.raises(MedgenError, match="decoder_layers"):
        create_model("parallel-vae", image_size=16, decoder="broadcast", decoder_layers=0)
    with pytest.raises(MedgenError, match="must be int"):
        create_model("parallel-vae", decoder_width=2.5)


def test_mixture_nll_values():
    x = torch.zeros(1, 1, 2, 2)
    images = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)]).unsqueeze(0)  # [1, K=2, 1, 2, 2]
    # decoder 0 sure and exact: zero loss
    sure = torch.stack([torch.full((1, 2, 2), 50.0), torch.full((1, 2, 2), -50.0)]).unsqueeze(0)
    assert mixture_nll(x, images, sure, sigma=0.5).item() == pytest.approx(0.0, abs=1e-6)
    # the wrong decoder sure: 0.5 * (1 / sigma)^2 per pixel
    assert mixture_nll(x, images, -sure, sigma=0.5).item() == pytest.approx(2.0, rel=1e-4)
    # equal weights: -log(0.5 * 1 + 0.5 * exp(-2)) per pixel, not the error of the 50/50 blend
    even = torch.zeros(1, 2, 1, 2, 2)
    expected = -np.log(0.5 + 0.5 * np.exp(-2.0))
    assert mixture_nll(x, images, even, sigma=0.5).item() == pytest.approx(expected, rel=1e-5)
    # one decoder: the plain Gaussian error sum (x - mu)^2 / (2 sigma^2) per element
    one = mixture_nll(x, images[:, 1:], torch.zeros(1, 1, 1, 2, 2), sigma=0.1)
    assert one.item() == pytest.approx(50.0, rel=1e-5)


def test_kl_ramp_reaches_the_end_early():
    assert kl_multiplier(0.0, 1.0, 0, 101, ramp=0.5) == pytest.approx(0.0)
    assert kl_multiplier(0.0, 1.0, 25, 101, ramp=0.5) == pytest.approx(0.5)
    assert kl_multiplier(0.0, 1.0, 50, 101, ramp=0.5) == pytest.approx(1.0)
    assert kl_multiplier(0.0, 1.0, 90, 101, ramp=0.5) == pytest.approx(1.0)


def test_step_rejects_bad_likelihood_and_sigma():
    with pytest.raises(MedgenError, match="likelihood"):
        create_step("parallel-vae", likelihood="bernoulli")
    with pytest.raises(MedgenError, match="sigma"):
        create_step("parallel-vae", likelihood="mixture", sigma=0.0)
    with pytest.raises(MedgenError, match="kl_ramp"):
        create_step("parallel-vae", kl_ramp=0.0)


def test_mixture_training_with_broadcast_decoders_learns():
    torch.manual_seed(0)
    x = _tiny_scenes(n=6, size=16)
    model = create_model("parallel-vae", spatial_dims=2, in_channels=3, image_size=16, num_decoders=3,
                         latent_per_decoder=8, base_width=4, decoder="broadcast", decoder_width=8, decoder_layers=2)
    step = create_step("parallel-vae", likelihood="mixture", sigma=0.2, kl_start=0.0, kl_end=0.01,
                       individual_multiplier=1.0, individual_exponent=1.0)
    losses = [h["recon"] for h in _run_steps(model, step, x, lr=3e-3, iterations=40)]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_broadcast_interpolate_grows_a_small_grid_to_the_image():
    torch.manual_seed(0)
    model = create_model("parallel-vae", spatial_dims=2, in_channels=3, image_size=32, num_decoders=3,
                         latent_per_decoder=4, base_width=4, broadcast_size=8, broadcast_grow="interpolate",
                         **BROADCAST).eval()
    conv = create_model("parallel-vae", spatial_dims=2, in_channels=3, image_size=32, num_decoders=3,
                        latent_per_decoder=4, base_width=4, broadcast_size=8, **BROADCAST)
    out = model(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert out.images.shape == (2, 3, 3, 32, 32)
    assert torch.allclose(out.weights.sum(dim=1), torch.ones(1), atol=1e-6)
    # no conv at full resolution: fewer weights than the conv-upsampling variant
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in conv.parameters())
    with pytest.raises(MedgenError, match="broadcast_grow"):
        create_model("parallel-vae", image_size=16, decoder="broadcast", broadcast_grow="magic")


def test_broadcast_model_state_round_trip():
    import io

    kwargs = dict(spatial_dims=2, in_channels=3, image_size=16, num_decoders=2, latent_per_decoder=4, base_width=4,
                  broadcast_size=8, broadcast_grow="interpolate", **BROADCAST)
    torch.manual_seed(0)
    a = create_model("parallel-vae", **kwargs).eval()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(1)
    b = create_model("parallel-vae", **kwargs).eval()
    b.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(a(x).recon, b(x).recon)


SLOTS = dict(encoder="slots", slot_size=8, slot_feature_size=8, slot_iterations=2)


@pytest.mark.parametrize("dims", [2, 3])
def test_slot_encoder_shapes_and_competition(dims):
    torch.manual_seed(0)
    model = create_model("parallel-vae", spatial_dims=dims, in_channels=1, image_size=16, num_decoders=3,
                         latent_per_decoder=4, base_width=4, **BROADCAST, **SLOTS)
    x = torch.rand(2, 1, *(16,) * dims) * 2 - 1
    out = model(x, noise=torch.randn(2, 3, 4))
    assert out.mu.shape == out.logvar.shape == (2, 3, 4)
    assert out.recon.shape == x.shape
    slots, attn = model.encoder.attend(x)
    assert slots.shape == (2, 3, 8)
    assert attn.shape == (2, 3, 8**dims)
    # the softmax runs over the slots: every token's attention sums to one across them
    assert torch.allclose(attn.sum(dim=1), torch.ones(1), atol=1e-5)
    out.recon.pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_slot_heads_are_per_decoder():
    torch.manual_seed(0)
    model = create_model("parallel-vae", spatial_dims=2, in_channels=3, image_size=16, num_decoders=3,
                         latent_per_decoder=4, base_width=4, **BROADCAST, **SLOTS).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mu, _ = model.encode(x)
    with torch.no_grad():
        model.encoder.head_weight[1].add_(1.0)
    mu2, _ = model.encode(x)
    assert torch.allclose(mu[:, [0, 2]], mu2[:, [0, 2]], atol=1e-6)
    assert not torch.allclose(mu[:, 1], mu2[:, 1])


def test_slot_encoder_bad_arguments():
    with pytest.raises(MedgenError, match="encoder must be one of"):
        create_model("parallel-vae", image_size=16, encoder="transformer")
    with pytest.raises(MedgenError, match="slot_feature_size"):
        create_model("parallel-vae", image_size=16, encoder="slots", slot_feature_size=12)
    with pytest.raises(MedgenError, match="slot_iterations"):
        create_model("parallel-vae", image_size=16, encoder="slots", slot_iterations=0)
    with pytest.raises(MedgenError, match="slot_size"):
        create_model("parallel-vae", image_size=16, encoder="slots", slot_size=0)


def test_slot_training_with_warmup_learns():
    torch.manual_seed(0)
    x = _tiny_scenes(n=6, size=16)
    model = create_model("parallel-vae", spatial_dims=2, in_channels=3, image_size=16, num_decoders=3,
                         latent_per_decoder=8, base_width=4, **BROADCAST, **SLOTS)
    step = create_step("parallel-vae", likelihood="mixture", sigma=0.2, kl_start=0.0, kl_end=0.01,
                       individual_multiplier=1.0, individual_exponent=1.0, lr_warmup=10)
    history = _run_steps(model, step, x, lr=3e-3, iterations=50)
    losses, rates = [h["recon"] for h in history], [h["lr"] for h in history]
    assert rates[0] == pytest.approx(3e-4) and rates[4] == pytest.approx(1.5e-3) and rates[-1] == pytest.approx(3e-3)
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    with pytest.raises(MedgenError, match="lr_warmup"):
        create_step("parallel-vae", lr_warmup=-1)


def test_lr_final_cosine_after_warmup():
    step = create_step("parallel-vae", lr_warmup=10, lr_final=0.1)
    total = 111  # warm-up 0..9, cosine over iterations 10..110
    assert step.lr_factor(0, total) == pytest.approx(0.1) and step.lr_factor(9, total) == pytest.approx(1.0)
    assert step.lr_factor(10, total) == pytest.approx(1.0)
    assert step.lr_factor(60, total) == pytest.approx(0.55)  # half-way: the mean of 1 and 0.1
    assert step.lr_factor(110, total) == pytest.approx(0.1)
    factors = [step.lr_factor(i, total) for i in range(10, total)]
    assert all(a >= b for a, b in zip(factors[:-1], factors[1:], strict=True))
    constant = create_step("parallel-vae", lr_warmup=10)
    assert [constant.lr_factor(i, total) for i in (9, 50, 110)] == [1.0, 1.0, 1.0]
    for bad in (0.0, 1.5):
        with pytest.raises(MedgenError, match="lr_final"):
            create_step("parallel-vae", lr_final=bad)


def test_random_slot_starts_use_the_noise_and_a_stored_draw_without_it():
    import io

    torch.manual_seed(0)
    kwargs = dict(spatial_dims=2, in_channels=3, image_size=16, num_decoders=3, latent_per_decoder=4, base_width=4,
                  **BROADCAST, **SLOTS, slot_init="random")
    model = create_model("parallel-vae", **kwargs).eval()
    assert model.slot_noise_shape == (3, 8)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    a, b = model(x).mu, model(x).mu
    assert torch.equal(a, b)  # inference: the stored draws
    noisy = model(x, slot_noise=torch.randn(2, 3, 8)).mu
    assert not torch.allclose(a, noisy)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(1)
    other = create_model("parallel-vae", **kwargs).eval()
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(other(x).mu, a)  # the inference draws travel with the weights
    assert create_model("parallel-vae", **{**kwargs, "slot_init": "learned"}).slot_noise_shape is None
    with pytest.raises(MedgenError, match="slot_init"):
        create_model("parallel-vae", **{**kwargs, "slot_init": "zeros"})


def test_shared_decoder_is_one_function_of_each_latent():
    torch.manual_seed(0)
    model = create_model("parallel-vae", spatial_dims=2, in_channels=3, image_size=16, num_decoders=3,
                         latent_per_decoder=4, base_width=4, **BROADCAST, decoder_shared=True).eval()
    separate = create_model("parallel-vae", spatial_dims=2, in_channels=3, image_size=16, num_decoders=3,
                            latent_per_decoder=4, base_width=4, **BROADCAST)
    z = torch.randn(2, 3, 4)
    _, images, logits, _ = model.decode(z)
    _, images_p, logits_p, _ = model.decode(z[:, [2, 0, 1]])
    # swapping two latents swaps the two decoders' outputs: the weights are the same
    assert torch.allclose(images_p, images[:, [2, 0, 1]], atol=1e-6)
    assert torch.allclose(logits_p, logits[:, [2, 0, 1]], atol=1e-6)
    assert sum(p.numel() for p in model.decoders.parameters()) < sum(p.numel() for p in separate.decoders.parameters())


def test_training_with_random_slots_and_a_shared_decoder_learns():
    torch.manual_seed(0)
    x = _tiny_scenes(n=6, size=16)
    model = create_model("parallel-vae", spatial_dims=2, in_channels=3, image_size=16, num_decoders=3,
                         latent_per_decoder=8, base_width=4, **BROADCAST, **SLOTS, slot_init="random",
                         decoder_shared=True)
    step = create_step("parallel-vae", kl_start=0.0, kl_end=0.001, individual_multiplier=1.0,
                       individual_exponent=1.0, lr_warmup=5)
    losses = [h["recon"] for h in _run_steps(model, step, x, lr=3e-3, iterations=50)]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])  # MSE: 0.13 -> 0.08 in 50 steps


@pytest.mark.parametrize("dims,size", [(2, 1), (2, 4), (3, 1), (3, 16)])
def test_appearance_head_draws_coarse_images_and_the_decoders_only_masks(dims, size):
    torch.manual_seed(0)
    model = create_model("parallel-vae", spatial_dims=dims, in_channels=2, image_size=16, num_decoders=3,
                         latent_per_decoder=4, base_width=4, appearance_size=size).eval()
    x = torch.rand(2, 2, *(16,) * dims) * 2 - 1
    out = model(x)
    assert out.images.shape == (2, 3, 2, *(16,) * dims)
    assert out.logits.shape == (2, 3, 1, *(16,) * dims)
    assert torch.allclose(out.weights.sum(dim=1), torch.ones(1), atol=1e-6)
    if size == 1:  # one colour per decoder and image
        flat = out.images.flatten(3)
        assert torch.allclose(flat, flat[..., :1].expand_as(flat))
    # decoders start with distinct colours spread over [-0.9, 0.9]
    zero = model.appearance(torch.zeros(1, 3, 4))
    assert torch.allclose(zero.flatten(2)[0, :, 0], torch.tensor([-0.9, 0.0, 0.9]), atol=1e-5)
    # decoder 0's latent moves decoder 0's colour only
    z = out.mu.clone()
    z[:, 0] += 1.0
    _, images, _, _ = model.decode(z)
    assert not torch.allclose(images[:, 0], out.images[:, 0])
    assert torch.allclose(images[:, 1:], out.images[:, 1:], atol=1e-6)
    out.recon.pow(2).mean().backward()
    assert model.appearance_weight.grad is not None and model.appearance_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dims", [2, 3])
def test_shaded_appearance_keeps_each_decoders_colour_and_varies_its_brightness(dims):
    torch.manual_seed(0)
    model = create_model("parallel-vae", spatial_dims=dims, in_channels=3, image_size=16, num_decoders=3,
                         latent_per_decoder=4, base_width=4, appearance_size=1, appearance_shading=True).eval()
    out = model(torch.rand(2, 3, *(16,) * dims) * 2 - 1)
    assert out.images.shape == (2, 3, 3, *(16,) * dims)
    assert out.logits.shape == (2, 3, 1, *(16,) * dims)
    intensity = ((out.images + 1) / 2).flatten(3)  # [B, K, C, N] in [0, 1]
    assert intensity.min() >= 0 and intensity.max() <= 1
    # one colour per decoder: the channels' ratios are the same at every pixel, the brightness is not
    ratio = intensity[:, :, 0] / intensity[:, :, 1]
    assert torch.allclose(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-4)
    red = intensity[:, :, 0]
    assert (red.std(dim=-1) / red.mean(dim=-1) > 1e-3).all()  # the shade map varies over the image
    # colours start bright (a shade only darkens): spread over [0, 0.9], not [-0.9, 0.9]
    zero = model.appearance(torch.zeros(1, 3, 4))
    assert torch.allclose(zero.flatten(2)[0, :, 0], torch.tensor([0.0, 0.45, 0.9]), atol=1e-5)
    out.recon.pow(2).mean().backward()
    assert model.appearance_weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoders.parameters())


def test_shading_refused_without_an_appearance_head():
    with pytest.raises(MedgenError, match="appearance_shading"):
        create_model("parallel-vae", image_size=16, appearance_size=0, appearance_shading=True)


def test_appearance_size_refused_unless_a_halving_of_the_image():
    with pytest.raises(MedgenError, match="appearance_size"):
        create_model("parallel-vae", image_size=16, appearance_size=3)
    with pytest.raises(MedgenError, match="appearance_size"):
        create_model("parallel-vae", image_size=16, appearance_size=-1)
    assert create_model("parallel-vae", image_size=16, appearance_size=0).appearance_size == 0


def test_mixture_with_one_colour_per_decoder_splits_a_volume_by_intensity():
    # three intensity classes in random blobs: the decoders' colours must settle near the class intensities
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    field = torch.nn.functional.avg_pool3d(torch.rand(8, 1, 16, 16, 16, generator=gen), 5, 1, 2)
    q = torch.quantile(field.flatten(), torch.tensor([1 / 3, 2 / 3]))
    truth = (field > q[0]).long() + (field > q[1]).long()  # [8, 1, 16, 16, 16] in {0, 1, 2}
    x = torch.tensor([-0.5, 0.2, 0.6])[truth] + 0.05 * torch.randn(truth.shape, generator=gen)
    model = create_model("parallel-vae", spatial_dims=3, in_channels=1, image_size=16, num_decoders=3,
                         latent_per_decoder=8, base_width=4, appearance_size=1)
    step = create_step("parallel-vae", likelihood="mixture", sigma=0.1, kl_start=0.0, kl_end=0.001,
                       individual_multiplier=1.0, individual_exponent=1.0)
    _run_steps(model, step, x, lr=3e-3, iterations=100)
    model.eval()
    with torch.no_grad():
        colours = model(x).images[..., 0, 0, 0].squeeze(-1)  # [8, K]
    # every class intensity has a decoder colour close to it
    for level in (-0.5, 0.2, 0.6):  # 0.2-0.4 from the starting colours -0.9, 0, 0.9
        assert (colours - level).abs().min(dim=1).values.max() < 0.15


def test_concave_kl_exponent_prefers_fewer_decoders_in_use_and_keeps_gradients_finite():
    kw = dict(elements=100, multiplier=1.0, individual_multiplier=1.0)
    one, two = torch.tensor([20.0, 0.0]), torch.tensor([10.0, 10.0])  # the same information in one or two decoders
    assert kl_term(one, individual_exponent=0.5, **kw) < kl_term(two, individual_exponent=0.5, **kw)
    assert kl_term(one, individual_exponent=2.0, **kw) > kl_term(two, individual_exponent=2.0, **kw)
    kl = torch.zeros(3, requires_grad=True)
    value = kl_term(kl, individual_exponent=0.5, **kw)
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(kl.grad).all() and (kl.grad > 0).all()
    with pytest.raises(MedgenError, match="individual_exponent"):
        create_step("parallel-vae", individual_exponent=0.0)


def test_mask_entropy_is_zero_for_one_decoder_per_pixel_and_log_k_for_even_blends():
    hard = torch.zeros(2, 4, 1, 3, 3)
    hard[:, 1] = 1
    assert mask_entropy(hard).item() == pytest.approx(0.0, abs=1e-6)
    assert mask_entropy(torch.full((2, 4, 1, 3, 3), 0.25)).item() == pytest.approx(np.log(4), rel=1e-5)
    for bad in (dict(mask_entropy=-0.1), dict(mask_entropy_start=1.0)):
        with pytest.raises(MedgenError, match="mask_entropy"):
            create_step("parallel-vae", **bad)


def test_mask_entropy_term_ramps_in_late_and_hardens_the_masks():
    # two flat colour regions and 3 decoders: with the term on from half the run the final masks are harder
    x = torch.full((4, 3, 16, 16), -0.6)
    x[:, :, :, 8:] = 0.5
    entropy = {}
    for h in (0.0, 0.2):
        torch.manual_seed(0)
        model = create_model("parallel-vae", spatial_dims=2, in_channels=3, image_size=16, num_decoders=3,
                             latent_per_decoder=4, base_width=4, decoder="broadcast", decoder_width=8,
                             decoder_layers=2, appearance_size=1)
        step = create_step("parallel-vae", kl_start=0.0, kl_end=0.001, individual_multiplier=1.0,
                           individual_exponent=1.0, mask_entropy=h, mask_entropy_start=0.5)
        history = _run_steps(model, step, x, lr=3e-3, iterations=80)
        if h:
            mults = [r["entropy_mult"] for r in history]
            assert mults[39] == 0.0 and 0 < mults[43] < h and mults[-1] == pytest.approx(h)
        else:
            assert "mask_entropy" not in history[-1]
        with torch.no_grad():
            entropy[h] = mask_entropy(model.eval()(x).weights).item()
    assert entropy[0.2] < 0.5 * entropy[0.0]
