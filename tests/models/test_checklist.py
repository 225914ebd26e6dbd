"""One checklist over every registered model, 2D and 3D at tiny widths.

Protocol every model class follows (so new models are checked without editing this file):
- classmethod `tiny_kwargs(spatial_dims) -> dict`: small constructor arguments (base_width 2-4, image_size 16-32);
- optionally `example_inputs(batch_size, generator) -> dict`: forward() keyword arguments; without it the
  test passes `x` (random images of the model's shape) and `labels` when forward takes them.
Generative models (those with `sample`) must also have `latent_dim` and decode to [-1, 1].
"""

from __future__ import annotations

import dataclasses
import inspect
import io

import pytest
import torch

from medgen.models import create_model, list_models
from medgen.models.registry import get_model_class

BATCH = 2
CASES = [(name, sd) for name in list_models() for sd in (2, 3)]


def make_inputs(model: torch.nn.Module, kwargs: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    if hasattr(model, "example_inputs"):
        return model.example_inputs(BATCH, g)
    shape = (BATCH, kwargs.get("in_channels", 1)) + (kwargs.get("image_size", 16),) * kwargs["spatial_dims"]
    inputs = {"x": torch.rand(shape, generator=g) * 2 - 1}
    if "labels" in inspect.signature(model.forward).parameters:
        inputs["labels"] = torch.arange(BATCH) % max(kwargs.get("num_classes", 1), 1)
    return inputs


def tensor_fields(out) -> dict[str, torch.Tensor]:
    assert dataclasses.is_dataclass(out), f"forward must return a dataclass, got {type(out).__name__}"
    return {f.name: getattr(out, f.name) for f in dataclasses.fields(out)
            if isinstance(getattr(out, f.name), torch.Tensor)}


@pytest.mark.parametrize(("name", "spatial_dims"), CASES, ids=[f"{n}-{d}d" for n, d in CASES])
def test_model_checklist(name: str, spatial_dims: int) -> None:
    cls = get_model_class(name)
    assert hasattr(cls, "tiny_kwargs"), f"model {name!r} must define classmethod tiny_kwargs(spatial_dims)"
    kwargs = cls.tiny_kwargs(spatial_dims)
    assert kwargs["spatial_dims"] == spatial_dims
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    inputs = make_inputs(model, kwargs)

    # forward: named outputs, batch first, finite
    model.train()
    out = tensor_fields(model(**inputs))
    assert out, "forward returned no tensors"
    for key, t in out.items():
        assert t.shape[0] == BATCH, f"{key}: batch dimension {t.shape}"
        assert torch.isfinite(t).all(), f"{key} has non-finite values"
    if "x" in inputs and "recon" in out:
        assert out["recon"].shape == inputs["x"].shape

    # backward: every trainable parameter gets a finite gradient
    loss = sum(t.float().mean() for t in out.values() if t.is_floating_point() and t.requires_grad)
    loss.backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"

    # generative models: sample(z, labels) decodes to images in [-1, 1]
    if hasattr(model, "sample"):
        model.eval()
        z = torch.randn(BATCH, model.latent_dim, generator=torch.Generator().manual_seed(1))
        labels = torch.arange(BATCH) % max(kwargs.get("num_classes", 1), 1)
        with torch.no_grad():
            images = model.sample(z, labels)
        size = kwargs.get("image_size", 16)
        assert images.shape[0] == BATCH and tuple(images.shape[2:]) == (size,) * spatial_dims
        assert images.shape[1] == kwargs.get("in_channels", 1)
        assert images.min() >= -1 and images.max() <= 1

    # save -> load into a fresh model gives identical outputs in eval mode
    model.eval()
    with torch.no_grad():
        ref = tensor_fields(model(**inputs))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(123)
    fresh = create_model(name, **kwargs).eval()
    with torch.no_grad():
        before = tensor_fields(fresh(**inputs))
    assert any(not torch.equal(before[k], ref[k]) for k in ref), "fresh model already equal: test is vacuous"
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        after = tensor_fields(fresh(**inputs))
    for key in ref:
        torch.testing.assert_close(after[key], ref[key], rtol=0, atol=0, msg=f"{key} differs after reload")
