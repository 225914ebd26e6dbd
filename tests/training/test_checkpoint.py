"""Checkpoints: self-describing round trip, atomic write, and safe loading (weights only)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from test_loop import NAME, cfg, registered_dummy, run, tiny_data  # noqa: F401  (the dummy model's fixture)

from medgen.checkpoint import (
    checkpoint_sha256,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from medgen.errors import MedgenError

MARKER_ENV = "MEDGEN_TEST_MARKER"


class Payload:
    """Unpickling this would create a marker file: proof that code in a checkpoint ran."""

    def __reduce__(self):
        return (open, (os.environ[MARKER_ENV], "w"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "run"
    run(out, train=cfg(iterations=4))
    return out


def test_round_trip_gives_equal_outputs(trained):
    model, meta = model_from_checkpoint(trained)  # a run folder resolves to final.pt
    assert meta["path"].endswith("final.pt") and meta["model"] == NAME and meta["step"] == 4
    assert isinstance(meta["affine"], np.ndarray) and meta["affine"][0, 0] == 3.0
    assert meta["class_names"] == ["CN", "MCI", "AD"] and len(meta["sha256"]) == 64
    again, _ = model_from_checkpoint(trained / "final.pt")
    z, labels = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2])
    with torch.no_grad():
        assert torch.equal(model.sample(z, labels), again.sample(z, labels))
    raw, meta_raw = model_from_checkpoint(trained, ema=False)
    assert meta_raw["weights"] == "model" and meta["weights"] == "ema"
    with torch.no_grad():
        assert not torch.equal(raw.sample(z, labels), model.sample(z, labels))  # EMA differs from raw weights


def test_checkpoint_loads_with_weights_only_and_hash_is_stable(trained):
    ck = torch.load(trained / "final.pt", weights_only=True)
    assert ck["format"] == "medgen-checkpoint" and ck["version"] == 1
    assert set(ck["rng"]) >= {"torch", "step", "augment", "order"}
    assert checkpoint_sha256(trained) == checkpoint_sha256(trained / "final.pt")


def test_pickled_object_is_refused_and_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    evil = tmp_path / "evil.pt"
    torch.save({"format": "medgen-checkpoint", "version": 1, "model": NAME, "payload": Payload()}, evil)
    assert not marker.exists()
    with pytest.raises(MedgenError, match="holds Python objects; refusing to load"):
        load_checkpoint(evil)
    with pytest.raises(MedgenError, match="holds Python objects"):
        model_from_checkpoint(evil)
    assert not marker.exists()


def test_corrupt_truncated_and_foreign_files(tmp_path, trained):
    data = (trained / "final.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(MedgenError, match="corrupt"):
        load_checkpoint(tmp_path / "trunc.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(MedgenError, match="corrupt"):
        load_checkpoint(tmp_path / "junk.pt")
    (tmp_path / "text.pt").write_bytes(b"junk\n")  # the legacy reader fails with a KeyError here
    with pytest.raises(MedgenError, match="corrupt"):
        load_checkpoint(tmp_path / "text.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(MedgenError, match="not a medgen checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(MedgenError, match="holds model"):
        load_checkpoint(trained, expected_model="vae")
    with pytest.raises(MedgenError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(MedgenError, match="holds no checkpoint"):
        load_checkpoint(tmp_path)


def test_mismatched_weights_give_a_clear_error(tmp_path, trained):
    ck = load_checkpoint(trained)
    ck.pop("path")
    ck["kwargs"]["latent_dim"] = 5
    save_checkpoint(tmp_path / "bad.pt", ck)
    with pytest.raises(MedgenError, match="does not match the model"):
        model_from_checkpoint(tmp_path / "bad.pt")


def test_save_is_atomic_and_rejects_objects(tmp_path):
    with pytest.raises(MedgenError, match="cannot store"):
        save_checkpoint(tmp_path / "x.pt", model_name=NAME, kwargs={"f": object()}, state={}, step=0)
    assert list(tmp_path.iterdir()) == []
    p = save_checkpoint(tmp_path / "x.pt", model_name=NAME, kwargs={"a": np.float32(1.5)},
                        state={"model": {}}, step=0, affine=tiny_data().affine)
    assert [q.name for q in tmp_path.iterdir()] == ["x.pt"]
    ck = load_checkpoint(p)
    assert ck["kwargs"]["a"] == 1.5 and ck["affine"].dtype == torch.float64


def test_checkpoints_written_before_a_kwarg_rename_still_load(tmp_path):
    """parallel-vae's per-decoder size was the kwarg `latent_dim` before it became `latent_per_decoder`."""
    from medgen.checkpoint import build_checkpoint
    from medgen.models.registry import create_model

    new = dict(spatial_dims=2, in_channels=3, image_size=16, num_decoders=3, latent_per_decoder=4, base_width=4)
    model = create_model("parallel-vae", **new)
    old = {("latent_dim" if k == "latent_per_decoder" else k): v for k, v in new.items()}
    path = save_checkpoint(tmp_path / "old.pt", build_checkpoint(model_name="parallel-vae", kwargs=old,
                                                                  state={"model": model.state_dict()}, step=1))
    loaded, meta = model_from_checkpoint(path)
    assert meta["kwargs"]["latent_per_decoder"] == 4 and "latent_dim" not in meta["kwargs"]
    assert loaded.latent_per_decoder == 4 and loaded.latent_dim == 12
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
