import numpy as np
import pytest
import torch

from medgen.data import scenes as S
from medgen.errors import MedgenError
from medgen.models import create_model
from medgen.runtime import resolve_precision
from medgen.training.steps import Batch, StepContext, create_step
from medgen.training.steps.parallel_vae import kl_multiplier, kl_per_decoder, kl_term


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


def test_short_training_run_loss_decreases():
    torch.manual_seed(0)
    x = _tiny_scenes(n=6)
    model = create_model("parallel-vae", spatial_dims=2, in_channels=3, image_size=32, num_decoders=3,
                         latent_per_decoder=8, base_width=4)
    step = create_step("parallel-vae", kl_start=0.0, kl_end=0.01)
    opt = step.optimizers(model, 2e-3)
    ctx = StepContext(precision=resolve_precision("fp32", torch.device("cpu")),
                      generator=torch.Generator().manual_seed(0), total_iterations=30)
    losses = []
    for it in range(30):
        ctx.iteration = it
        out = step(model, Batch(images=x, labels=torch.zeros(len(x), dtype=torch.int64)), opt, ctx)
        assert set(out) >= {"loss", "recon", "kl", "kl_term"}
        losses.append(float(out["loss"]))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])


def test_step_rejects_unknown_key():
    with pytest.raises(MedgenError, match="kl_strat"):
        create_step("parallel-vae", kl_strat=1.0)
