"""Loss functions against hand-computed values; the gradient penalty under bf16 autocast."""

from __future__ import annotations

import math

import pytest
import torch

from medgen import losses
from medgen.errors import MedgenError
from medgen.models.networks import Discriminator


def test_kl_divergence_known_values() -> None:
    zeros = torch.zeros(4, 3)
    assert losses.kl_divergence(zeros, zeros).item() == 0.0
    mu = torch.ones(4, 3)  # 0.5 * mu^2 per unit
    assert losses.kl_divergence(mu, zeros).item() == pytest.approx(0.5)
    assert losses.kl_divergence(mu, zeros, per_element=False).item() == pytest.approx(1.5)
    logvar = torch.full((4, 3), math.log(2.0))  # 0.5 * (2 - 1 - log 2)
    assert losses.kl_divergence(zeros, logvar).item() == pytest.approx(0.5 * (1 - math.log(2.0)))


def test_reconstruction_losses() -> None:
    a, b = torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), 0.5)
    assert losses.reconstruction(a, b, "l1").item() == pytest.approx(0.5)
    assert losses.reconstruction(a, b, "mse").item() == pytest.approx(0.25)
    with pytest.raises(MedgenError, match="l1"):
        losses.reconstruction(a, b, "huber")


def test_adversarial_losses() -> None:
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.0])
    assert losses.wgan_critic_loss(real, fake).item() == pytest.approx(-0.5 - 2.0)
    assert losses.wgan_generator_loss(fake).item() == pytest.approx(0.5)
    zero = torch.zeros(3)
    assert losses.bce_critic_loss(zero, zero).item() == pytest.approx(2 * math.log(2))
    assert losses.bce_generator_loss(zero).item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("norm", [1.0, 3.0])
def test_gradient_penalty_of_a_linear_critic(norm: float) -> None:
    """D(x) = <w, x> + b[label] has gradient w everywhere, so the penalty is (||w|| - 1)^2 for any
    interpolate, and its gradient with respect to w is 2 (||w|| - 1) w / ||w||."""
    torch.manual_seed(0)
    w0 = torch.randn(1, 2, 3, 3)
    w = (w0 * norm / w0.norm()).requires_grad_(True)
    bias = torch.randn(3)

    def critic(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (x * w).sum(dim=(1, 2, 3)) + bias[labels]

    real, fake = torch.randn(5, 2, 3, 3), torch.randn(5, 2, 3, 3)
    gp = losses.gradient_penalty(critic, real, fake, torch.tensor([0, 1, 2, 0, 1]),
                                 generator=torch.Generator().manual_seed(0))
    assert gp.item() == pytest.approx((norm - 1) ** 2, abs=1e-5)
    gp.backward()
    torch.testing.assert_close(w.grad, 2 * (norm - 1) * w.detach() / norm, atol=1e-5, rtol=1e-4)


def test_gradient_penalty_on_codes_without_labels() -> None:
    w = torch.tensor([3.0, 4.0])  # ||w|| = 5
    gp = losses.gradient_penalty(lambda z: z @ w, torch.randn(6, 2), torch.randn(6, 2), None)
    assert gp.item() == pytest.approx(16.0)


def test_gradient_penalty_is_fp32_and_finite_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    critic = Discriminator(spatial_dims=3, image_size=16, base_width=4, num_classes=3)
    real, fake = torch.randn(3, 1, 16, 16, 16), torch.randn(3, 1, 16, 16, 16)
    labels = torch.tensor([0, 1, 2])
    ref = losses.gradient_penalty(critic, real, fake, labels, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fake_bf16 = fake.to(torch.bfloat16)  # as a generator under autocast would hand it over
        gp = losses.gradient_penalty(critic, real, fake_bf16, labels, generator=torch.Generator().manual_seed(1))
    assert gp.dtype == torch.float32 and torch.isfinite(gp)
    # the penalty ran outside autocast: same value as the fp32 call (fake only lost bf16 precision)
    torch.testing.assert_close(gp, ref, rtol=2e-2, atol=1e-3)
    gp.backward()
    for name, p in critic.named_parameters():
        if name == "head.linear.conv.bias":  # a constant offset does not change the input gradient
            assert p.grad is None
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_gradient_penalty_uses_given_interpolation_weights() -> None:
    """D(x) = ||x||^2 / 2 has gradient x: with alpha = 0 the interpolate is `real`, with alpha = 1 `fake`."""
    real, fake = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)

    def critic(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x.square().sum(dim=(1, 2, 3))

    for alpha, target in ((torch.zeros(4), real), (torch.ones(4), fake)):
        expected = (target.flatten(1).norm(dim=1) - 1).square().mean()
        gp = losses.gradient_penalty(critic, real, fake, None, alpha=alpha)
        assert gp.item() == pytest.approx(expected.item(), rel=1e-5)


def test_gradient_penalty_runs_a_compiled_critic_eagerly() -> None:
    """torch.compile has no double backward; the penalty must still train a compiled critic."""
    torch.manual_seed(0)
    critic = Discriminator(spatial_dims=2, image_size=16, base_width=2, num_classes=3)
    x, y = torch.randn(2, 1, 16, 16), torch.tensor([0, 2])
    ref = losses.gradient_penalty(critic, x, x.flip(0), y, alpha=torch.full((2,), 0.3))
    critic.compile(backend="aot_eager")
    gp = losses.gradient_penalty(critic, x, x.flip(0), y, alpha=torch.full((2,), 0.3))
    gp.backward()
    torch.testing.assert_close(gp, ref)
    assert torch.isfinite(critic.trunk[0].conv.weight.grad).all()
