"""Shared blocks and the architecture of the generative models (sizes, conditioning, memory format)."""

from __future__ import annotations

import pytest
import torch

from medgen.errors import MedgenError
from medgen.models.alpha_gan import AlphaGAN
from medgen.models.blocks import ClassConditionedLinear, DownBlock, ProjectionHead, UpBlock, num_stages
from medgen.models.gan import GAN
from medgen.models.networks import Discriminator
from medgen.models.vae import VAE


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("upsample", ["transpose", "nearest"])
def test_up_and_down_blocks_change_size_by_two(spatial_dims: int, upsample: str) -> None:
    x = torch.randn((2, 3) + (8,) * spatial_dims)
    down = DownBlock(spatial_dims=spatial_dims, in_channels=3, out_channels=5, norm="instance")
    up = UpBlock(spatial_dims=spatial_dims, in_channels=3, out_channels=5, upsample=upsample)
    assert down(x).shape == (2, 5) + (4,) * spatial_dims
    assert up(x).shape == (2, 5) + (16,) * spatial_dims


def test_bad_arguments_give_one_line_errors() -> None:
    assert num_stages(16) == 2 and num_stages(64) == 4
    for size in (4, 48, 0):
        with pytest.raises(MedgenError, match="image_size"):
            num_stages(size)
    with pytest.raises(MedgenError, match="upsample"):
        UpBlock(spatial_dims=3, in_channels=1, out_channels=1, upsample="bilinear")
    with pytest.raises(MedgenError, match="norm"):
        DownBlock(spatial_dims=3, in_channels=1, out_channels=1, norm="weird")
    with pytest.raises(MedgenError, match="batch"):
        Discriminator(spatial_dims=3, image_size=16, base_width=2, norm="batch")
    with pytest.raises(MedgenError, match="spatial_dims"):
        GAN(spatial_dims=1)


def test_class_conditioned_linear_is_a_linear_layer_on_one_hot_labels() -> None:
    torch.manual_seed(0)
    layer = ClassConditionedLinear(in_features=4, out_features=6, num_classes=3)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    full = torch.cat([layer.linear.weight, layer.embed.weight.T], dim=1)  # [6, 4 + 3]
    expected = torch.cat([x, torch.nn.functional.one_hot(y, 3).float()], dim=1) @ full.T + layer.linear.bias
    torch.testing.assert_close(layer(x, y), expected)


def test_projection_head_adds_the_class_inner_product() -> None:
    torch.manual_seed(0)
    head = ProjectionHead(spatial_dims=3, in_channels=2, num_classes=3)
    h, y = torch.randn(4, 2, 4, 4, 4), torch.tensor([0, 1, 2, 2])
    plain = head.linear(h).reshape(4)
    proj = (head.embed.weight[y] * h.reshape(4, -1)).sum(1)
    torch.testing.assert_close(head(h, y), plain + proj)
    # the class changes the score of the same image
    assert not torch.allclose(head(h, torch.zeros(4, dtype=torch.long)), head(h, torch.ones(4, dtype=torch.long)))


def test_published_size_on_the_meta_device() -> None:
    """base_width 64 at 64^3: latent -> 4^3 x 512 -> 256 -> 128 -> 64 -> 1 at 64^3 (3dbraingen layout)."""
    with torch.device("meta"):
        model = AlphaGAN(spatial_dims=3, image_size=64, base_width=64, latent_dim=1000)
        x = torch.empty(2, 1, 64, 64, 64)
        y = torch.zeros(2, dtype=torch.long)
        out = model(x, y)
        fake = model.sample(torch.empty(2, 1000), y)
    g = model.generator
    assert g.bottleneck_channels == 512 and len(g.stages) == 4
    convs = [m for m in g.stages.modules() if isinstance(m, torch.nn.ConvTranspose3d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(512, 256), (256, 128), (128, 64), (64, 1)]
    d_convs = [m for m in model.discriminator.trunk.modules() if isinstance(m, torch.nn.Conv3d)]
    assert [(c.in_channels, c.out_channels) for c in d_convs] == [(1, 64), (64, 128), (128, 256), (256, 512)]
    assert fake.shape == (2, 1, 64, 64, 64) and out.recon.shape == (2, 1, 64, 64, 64)
    assert out.code.shape == (2, 1000) and out.recon_score.shape == (2,) and out.code_score.shape == (2,)
    n_g = sum(p.numel() for p in g.parameters())
    # fc 1000 -> 512*64 (+ bias, + 3-class embedding) and the four transposed convs (k4, no bias but the last)
    fc = 1000 * 32768 + 32768 + 3 * 32768
    convs_n = (512 * 256 + 256 * 128 + 128 * 64 + 64 * 1) * 64 + 1
    norms = 2 * 512 + 2 * (256 + 128 + 64)
    assert n_g == fc + convs_n + norms


@pytest.mark.parametrize("cls", [GAN, VAE, AlphaGAN])
def test_channels_last_gives_the_same_outputs(cls) -> None:
    torch.manual_seed(0)
    model = cls(**cls.tiny_kwargs(3)).eval()
    inputs = model.example_inputs(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(**inputs)
        model = model.to(memory_format=torch.channels_last_3d)
        inputs = {k: v.to(memory_format=torch.channels_last_3d) if isinstance(v, torch.Tensor) and v.ndim == 5
                  else v for k, v in inputs.items()}
        out = model(**inputs)
    for field in ref.__dataclass_fields__:
        torch.testing.assert_close(getattr(out, field), getattr(ref, field), rtol=1e-4, atol=1e-5)


def test_nearest_upsampling_generator_and_unconditional_models() -> None:
    model = GAN(spatial_dims=2, image_size=32, base_width=2, latent_dim=4, num_classes=0, upsample="nearest",
                g_norm="instance", d_norm="none")
    out = model(torch.randn(3, 4), None)
    assert out.images.shape == (3, 1, 32, 32) and out.score.shape == (3,)
