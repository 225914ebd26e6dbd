"""evaluate-synth: the feature classifier and the per-class synthesis metrics of a checkpoint."""

from __future__ import annotations

import numpy as np
import torch

from medgen.config import TrainConfig
from medgen.data.dataset import ImageSet
from medgen.pipelines.evaluate_synth import evaluate_synthesis, feature_extractor
from medgen.training.loop import fit
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
                "nn_rmse_real_to_train", "nn_ratio"):
        assert np.isfinite(m[key]), key
    assert m["n_real"] == 4 and m["n_synthetic"] == 3
