"""One iteration of each generative model's Step on tiny 3D data."""

from __future__ import annotations

import pytest
import torch

from medgen.errors import MedgenError
from medgen.models import create_model
from medgen.runtime import resolve_precision
from medgen.training.steps import Batch, StepContext, create_step

TINY = dict(spatial_dims=3, image_size=16, base_width=2, latent_dim=8, num_classes=3)
STEP_KWARGS = {"vae": {}, "gan": {"n_critic": 2}, "alpha-gan": {}}


def setup(name: str, precision: str = "fp32", step_kwargs: dict | None = None, seed: int = 0):
    torch.manual_seed(seed)
    model = create_model(name, **TINY)
    step = create_step(name, **(STEP_KWARGS[name] if step_kwargs is None else step_kwargs))
    opt = step.optimizers(model, 1e-3)
    ctx = StepContext(precision=resolve_precision(precision, torch.device("cpu")),
                      generator=torch.Generator().manual_seed(seed), total_iterations=10)
    g = torch.Generator().manual_seed(seed + 1)
    batch = Batch(images=torch.rand(4, 1, 16, 16, 16, generator=g) * 2 - 1, labels=torch.tensor([0, 1, 2, 0]))
    return model, step, opt, ctx, batch


@pytest.mark.parametrize("name", ["vae", "gan", "alpha-gan"])
def test_one_iteration_updates_every_network_with_finite_losses(name: str) -> None:
    model, step, opt, ctx, batch = setup(name)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    out = step(model, batch, opt, ctx)
    assert out, "no losses returned"
    for key, value in out.items():
        assert value.ndim == 0 and not value.requires_grad, key
        assert torch.isfinite(value), f"{key} = {value}"
    # a Wasserstein critic's output bias cancels in E[D(fake)] - E[D(real)]: zero gradient by design
    exempt = {"discriminator.head.linear.conv.bias"}
    if hasattr(model, "code_discriminator"):
        exempt.add(f"code_discriminator.net.{len(model.code_discriminator.net) - 1}.bias")
    unchanged = [k for k, v in model.named_parameters() if torch.equal(v, before[k]) and k not in exempt]
    assert not unchanged, f"parameters not updated: {unchanged}"
    # the optimizers cover every parameter exactly once
    covered = [id(p) for o in opt.values() for g in o.param_groups for p in g["params"]]
    assert sorted(covered) == sorted(id(p) for p in model.parameters())


def test_alpha_gan_steps_each_optimizer_and_each_parameter_exactly_once() -> None:
    model, step, opt, ctx, batch = setup("alpha-gan")
    calls = {name: 0 for name in opt}
    for name, o in opt.items():
        original = o.step

        def counting(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        o.step = counting
    step(model, batch, opt, ctx)
    assert calls == {"encoder_generator": 1, "discriminator": 1, "code_discriminator": 1}
    # Adam counts its updates per parameter: every parameter of E, G, D and C moved exactly once
    for net in ("encoder", "generator", "discriminator", "code_discriminator"):
        for p in getattr(model, net).parameters():
            o = next(o for o in opt.values() if any(p is q for g in o.param_groups for q in g["params"]))
            assert int(o.state[p]["step"]) == 1, net


def test_gan_step_runs_n_critic_critic_updates() -> None:
    model, step, opt, ctx, batch = setup("gan", step_kwargs={"n_critic": 3})
    step(model, batch, opt, ctx)
    assert int(opt["discriminator"].state[next(model.discriminator.parameters())]["step"]) == 3
    assert int(opt["generator"].state[next(model.generator.parameters())]["step"]) == 1


@pytest.mark.parametrize(("name", "kwargs"), [("alpha-gan", {}), ("gan", {"n_critic": 1}),
                                              ("alpha-gan", {"variant": "bce"}), ("vae", {"recon": "mse"})])
def test_steps_are_finite_under_bf16_autocast(name: str, kwargs: dict) -> None:
    model, step, opt, ctx, batch = setup(name, precision="bf16", step_kwargs=kwargs)
    out = step(model, batch, opt, ctx)
    assert all(torch.isfinite(v) for v in out.values()), out
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_same_seed_same_losses() -> None:
    a = setup("alpha-gan")
    b = setup("alpha-gan")
    out_a, out_b = a[1](*a[0:1], a[4], a[2], a[3]), b[1](*b[0:1], b[4], b[2], b[3])
    for key in out_a:
        torch.testing.assert_close(out_a[key], out_b[key], rtol=0, atol=0)


def test_vae_kl_warmup_and_bad_step_arguments() -> None:
    _, step, _, ctx, _ = setup("vae", step_kwargs={"beta": 2.0, "kl_warmup": 0.5})
    ctx.iteration = 0
    assert step.beta_at(ctx) == pytest.approx(2.0 * 1 / 5)
    ctx.iteration = 9
    assert step.beta_at(ctx) == pytest.approx(2.0)
    with pytest.raises(MedgenError, match="variant"):
        create_step("alpha-gan", variant="hinge")
    with pytest.raises(MedgenError, match="n_critic"):
        create_step("gan", n_critic=0)
    with pytest.raises(MedgenError, match="recon"):
        create_step("vae", recon="huber")
    with pytest.raises(MedgenError, match="l1_weigth|did you mean"):
        create_step("alpha-gan", l1_weigth=5.0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vae", "gan", "alpha-gan"])
def test_one_iteration_at_64_cubed(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, spatial_dims=3, image_size=64, base_width=8, latent_dim=128)
    step = create_step(name, **({"n_critic": 1} if name == "gan" else {}))
    opt = step.optimizers(model, 2e-4)
    ctx = StepContext(precision=resolve_precision("fp32", torch.device("cpu")),
                      generator=torch.Generator().manual_seed(0))
    batch = Batch(images=torch.rand(2, 1, 64, 64, 64) * 2 - 1, labels=torch.tensor([0, 2]))
    out = step(model, batch, opt, ctx)
    assert all(torch.isfinite(v) for v in out.values()), out
    with torch.no_grad():
        assert model.eval().sample(torch.randn(2, 128), torch.tensor([0, 1])).shape == (2, 1, 64, 64, 64)
