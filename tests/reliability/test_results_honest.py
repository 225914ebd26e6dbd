"""Issue 11 items 4-7 and 10: no non-finite weights kept or used, resume checks, one volume validation, labels."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medgen.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
    nonfinite_weights,
    save_checkpoint,
)
from medgen.config import TrainConfig
from medgen.data.dataset import ImageSet
from medgen.data.inspection import inspect_volume, volume_problem
from medgen.errors import MedgenError
from medgen.models import memory
from medgen.pipelines import synthesize as S
from medgen.pipelines.synthesize import write_synthetic
from medgen.training import preflight
from medgen.training.loop import fit

KW = {"base_width": 4, "latent_dim": 8}


def data(n: int = 6, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    return ImageSet(images=torch.rand(n, 1, 16, 16, 16, generator=g) * 2 - 1, labels=labels,
                    subjects=[f"s{i}" for i in range(n)], class_names=["CN", "MCI", "AD"],
                    affine=np.diag([6.0, 6.0, 6.0, 1.0]))


def train(out, *, lr=1e-3, seed=0, d=None, resume=False, iterations=2):
    t = TrainConfig(iterations=iterations, batch_size=2, lr=lr, precision="fp32", log_every=1, sample_every=0,
                    checkpoint_every=1)
    return fit("vae", d if d is not None else data(), out, model_kwargs=KW, train=t, device="cpu", seed=seed,
               resume=resume)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("r") / "run"
    train(out)
    return out


# ---------------------------------------------------------------- item 4

def test_diverging_training_never_writes_nonfinite_weights(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(MedgenError, match="non-finite|NaN|infinite") as info:
        train(out, lr=1e8, iterations=8)
    assert "loss loss" not in str(info.value)
    if (out / "last.pt").exists():
        assert nonfinite_weights(load_checkpoint(out / "last.pt")["state"]) == []


def test_save_checkpoint_refuses_nan_weights(tmp_path, run):
    ckpt = load_checkpoint(run / "last.pt")
    name = next(iter(ckpt["state"]["model"]))
    ckpt["state"]["model"][name] = ckpt["state"]["model"][name] * float("nan")
    with pytest.raises(MedgenError, match="non-finite"):
        save_checkpoint(tmp_path / "bad.pt", ckpt)
    assert not (tmp_path / "bad.pt").exists()


def _poisoned(tmp_path, run):
    ckpt = torch.load(run / "last.pt", weights_only=True)
    for part in ("model", "ema"):
        if ckpt["state"].get(part):
            name = next(k for k, v in ckpt["state"][part].items() if v.is_floating_point())
            ckpt["state"][part][name] = torch.full_like(ckpt["state"][part][name], float("nan"))
    path = tmp_path / "nan.pt"
    torch.save(ckpt, path)
    return path


def test_synth_and_segment_refuse_nonfinite_checkpoints(tmp_path, run):
    bad = _poisoned(tmp_path, run)
    with pytest.raises(MedgenError, match="non-finite weight"):
        model_from_checkpoint(bad)
    with pytest.raises(MedgenError, match="non-finite weight"):
        write_synthetic(bad, tmp_path / "syn", n=3)
    assert not (tmp_path / "syn").exists()


def test_synth_refuses_constant_volumes(tmp_path, run, monkeypatch):
    monkeypatch.setattr(S, "decode", lambda model, z, labels, **k: torch.full((len(z), 1, 16, 16, 16), -1.0))
    with pytest.raises(MedgenError, match="constant"):
        S.write_synthetic(run, tmp_path / "syn", n=3)
    assert not (tmp_path / "syn").exists()


# ---------------------------------------------------------------- item 5

def test_resume_refuses_other_seed_data_or_config(tmp_path):
    out = tmp_path / "run"
    train(out, iterations=1)
    with pytest.raises(MedgenError, match="seed 0, not 99"):
        train(out, seed=99, resume=True, iterations=2)
    with pytest.raises(MedgenError, match="other data"):
        train(out, d=data(seed=5), resume=True, iterations=2)
    with pytest.raises(MedgenError, match="different config"):
        train(out, lr=5e-3, resume=True, iterations=2)
    train(out, resume=True, iterations=2)  # same everything, more iterations: fine


# ---------------------------------------------------------------- item 6

def zero_affine_image() -> nib.Nifti1Image:
    h = nib.Nifti1Header()
    h.set_data_shape((16, 16, 16))
    h.set_data_dtype(np.float32)
    h.set_qform(None, code=0)
    h.set_sform(np.zeros((4, 4)), code=1)
    return nib.Nifti1Image(np.random.rand(16, 16, 16).astype(np.float32), None, header=h)


def test_one_volume_validation_with_minimum_size_and_affine():
    eye = np.eye(4)
    assert volume_problem((16, 16, 16), 0, eye) is None
    assert "too small" in volume_problem((2, 2, 2), 0, eye)
    assert "affine" in volume_problem((16, 16, 16), 0, np.zeros((4, 4)))
    assert "affine" in volume_problem((16, 16, 16), 0, np.diag([1.0, 0.0, 1.0, 1.0]))


def test_data_check_and_loading_agree_on_a_zero_affine(tmp_path):
    from medgen.data.check import check_dataset

    nib.save(zero_affine_image(), str(tmp_path / "z.nii.gz"))
    assert "affine" in inspect_volume(str(tmp_path / "z.nii.gz")).problem
    nib.save(nib.Nifti1Image(np.random.rand(16, 16, 16).astype(np.float32), np.eye(4)), str(tmp_path / "ok.nii.gz"))
    items = [{"image": "z.nii.gz", "label": "CN"}, {"image": "ok.nii.gz", "label": "AD"}]
    (tmp_path / "dl.json").write_text(json.dumps({"training": items}))
    summary = check_dataset(tmp_path / "dl.json").summary()
    assert any("affine" in p for p in summary["problems"])


# ---------------------------------------------------------------- item 7

@pytest.mark.parametrize("label", [1.5, "2.5"])
def test_non_integer_float_label_is_an_error(tmp_path, label):
    from medgen.data.datalist import read_datalist

    for i in range(2):
        nib.save(nib.Nifti1Image(np.random.rand(16, 16, 16).astype(np.float32), np.eye(4)), str(tmp_path / f"{i}.nii.gz"))
    (tmp_path / "dl.json").write_text(json.dumps({"training": [{"image": "0.nii.gz", "label": 1},
                                                               {"image": "1.nii.gz", "label": label}]}))
    with pytest.raises(MedgenError, match=r"training\[1\].*not an integer"):
        read_datalist(tmp_path / "dl.json")


# ---------------------------------------------------------------- item 10 and 12 (model memory)

def test_model_settings_are_checked_before_the_run_folder(tmp_path):
    with pytest.raises(MedgenError, match="base_width"):
        preflight.preflight_train("vae", {"base_width": -3}, {}, data(), "fp32", "cpu")
    with pytest.raises(MedgenError, match="precision"):
        preflight.preflight_train("vae", KW, {}, data(), "fp16", "cpu")


def test_checkpoint_kwargs_edited_to_a_huge_model_are_refused(run, monkeypatch):
    monkeypatch.setattr(memory, "_ram_bytes", lambda: 1 << 10)
    with pytest.raises(MedgenError, match="GiB"):
        model_from_checkpoint(run)


# ---------------------------------------------------------------- item 13

@pytest.mark.parametrize("image, match", [(12, "must be a file path string, got 12"), ("adir", "is a folder")])
def test_misleading_image_messages(tmp_path, image, match):
    from medgen.data.datalist import read_datalist

    (tmp_path / "adir").mkdir()
    (tmp_path / "dl.json").write_text(json.dumps({"training": [{"image": image, "label": "CN"}]}))
    with pytest.raises(MedgenError, match=match):
        read_datalist(tmp_path / "dl.json")
