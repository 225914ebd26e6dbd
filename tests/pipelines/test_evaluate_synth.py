"""evaluate-synth: the feature classifier and the per-class synthesis metrics of a checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medgen.config import TrainConfig
from medgen.data.dataset import ImageSet
from medgen.errors import MedgenError
from medgen.geometry import mni_affine
from medgen.pipelines.evaluate_synth import evaluate_synthesis, feature_extractor
from medgen.training.loop import fit
from tests.evaluation.test_fidelity import atlas_volumes
from tests.evaluation.test_metrics import blobs


def real_set(n: int = 12) -> ImageSet:
    labels = torch.arange(n) % 3
    images = (blobs(n) + 0.3 * labels.view(-1, 1, 1, 1, 1)).clamp(-1, 1)
    return ImageSet(images=images, labels=labels, subjects=[f"s{i}" for i in range(n)],
                    class_names=["CN", "MCI", "AD"], affine=np.diag([3.0, 3.0, 3.0, 1.0]))


def test_feature_extractor_trains_the_classifier():
    extract = feature_extractor(real_set(), iterations=2, batch_size=4, base_width=2)
    f = extract(real_set().images)
    assert f.ndim == 2 and f.shape[0] == 12 and torch.isfinite(f).all()


def test_evaluate_synthesis_per_class(tmp_path):
    real = real_set()
    fit("vae", real, tmp_path / "run", model_kwargs={"base_width": 4, "latent_dim": 8},
        train=TrainConfig(iterations=2, batch_size=4, precision="fp32", sample_every=0), device="cpu")
    result = evaluate_synthesis(tmp_path / "run", real, n_per_class=3, n_pairs=3,
                                extractor=lambda x: x.reshape(x.shape[0], -1)[:, :8])
    assert set(result["classes"]) == {"CN", "MCI", "AD"} and result["model"] == "vae"
    m = result["classes"]["AD"]
    for key in ("ms_ssim_synthetic", "ms_ssim_real", "mmd", "frechet", "nn_rmse_synthetic_to_train",
                "nn_rmse_real_to_train", "nn_ratio", "class_agreement", "two_sample_auc", "two_sample_auc_real",
                "precision", "recall", "density", "coverage", "coverage_real", "nn_ratio_real", "mmd_real"):
        assert np.isfinite(m[key]), key
    assert m["n_real"] == 4 and m["n_synthetic"] == 3
    assert result["overall"]["n_synthetic"] == 9 and 0 <= result["overall"]["class_agreement"] <= 1
    for group in ("anatomy", "histogram", "texture"):  # the two-sample AUC per feature group, with its reference
        assert 0 <= result["overall"][f"two_sample_auc_{group}"] <= 1
        assert 0 <= result["overall"][f"two_sample_auc_{group}_real"] <= 1
    assert "generator's training data (the checkpoint's data fingerprint matches)" in \
        result["settings"]["class_agreement_training_data"]


def phantom_like_set(n_per_class: int = 6) -> ImageSet:
    """16^3 volumes built from the template's tissue maps on the phantom grid, ventricles growing with class."""
    images = torch.cat([atlas_volumes(n_per_class, g, seed=k) for k, g in enumerate((0.0, 0.2, 0.5))])
    labels = torch.arange(3).repeat_interleave(n_per_class)
    return ImageSet(images=images, labels=labels, subjects=[f"s{i}" for i in range(len(labels))],
                    class_names=["CN", "MCI", "AD"], affine=mni_affine(16))


def test_evaluate_synthesis_effects_and_out_folder(tmp_path):
    real = phantom_like_set()
    fit("vae", real, tmp_path / "run", model_kwargs={"base_width": 4, "latent_dim": 8},
        train=TrainConfig(iterations=2, batch_size=4, precision="fp32", sample_every=0), device="cpu")
    out = tmp_path / "fidelity"
    result = evaluate_synthesis(tmp_path / "run", real, n_per_class=4, n_pairs=3, n_boot=200, out=out,
                                extractor=lambda x: x.reshape(x.shape[0], -1)[:, :8], data_label="test")
    assert result["settings"]["effects"]["measured"] and result["data"] == "test"
    ad = result["effects"]["AD vs CN"]["ventricle_csf_ml"]
    assert ad["real_effect"] > 0 and {"fraction", "fraction_low", "fraction_high", "reference"} <= set(ad)
    assert np.isfinite(ad["reference"]["fraction"])
    assert set(result["effects"]) == {"MCI vs CN", "AD vs CN", "AD vs MCI"}
    assert result["classes"]["AD"]["ventricle_csf_ml_real"] > result["classes"]["CN"]["ventricle_csf_ml_real"]
    assert {"metrics.json", "metrics.md", "montage.png", "effects.png", "fidelity.png"} <= {p.name for p in out.iterdir()}
    md = (out / "metrics.md").read_text()
    assert "class agreement" in md and "two-sample AUC" in md and "AD vs CN" in md and "coverage" in md
    assert json.loads((out / "metrics.json").read_text())["classes"].keys() == result["classes"].keys()
    # an existing folder is refused before anything is computed
    with pytest.raises(MedgenError, match="exists"):
        evaluate_synthesis(tmp_path / "run", real, out=out, extractor=lambda x: x.reshape(x.shape[0], -1)[:, :8])
