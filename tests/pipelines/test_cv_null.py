"""The null cohort: with no class differences (phantom effect_scale 0) no arm may claim a significant gain."""

from __future__ import annotations

import math

import pytest

from medgen.config import load_config
from medgen.pipelines.cv import run_cv


@pytest.mark.slow  # builds two small phantom cohorts and runs 3 folds of every arm (~3-5 min on 2 cores)
def test_null_cohort_has_no_significant_arm(tmp_path):
    cfg = load_config("smoke")
    cfg.device = "cpu"
    cfg.phantom.n = 90
    cfg.phantom.effect_scale = 0.0
    cfg.phantom.cache_dir = str(tmp_path / "cache")
    cfg.cv.folds = 3
    cfg.cv.test_size = 15
    cfg.cv.extra_test = 45
    cfg.cv.models = ["vae"]
    cfg.cv.learning_curve = [0.5]
    cfg.cv.generator_iterations = 20
    cfg.classifier.epochs = 4
    results = run_cv(cfg, tmp_path / "cv")
    keys = {a["arm"] for a in results["arms"]}
    assert {"oracle_f50", "vae_f50", "permuted_f50", "real_aug", "curve_50"} <= keys
    claims = [a["test_vs_real"]["p_holm"] for a in results["arms"] if "p_holm" in (a.get("test_vs_real") or {})]
    print(f"null cohort Holm p-values, smallest first: {sorted(claims)}")
    assert claims and all(not math.isnan(p) and p >= 0.05 for p in claims), claims
    ensemble = [a["ensemble_vs_real"]["p_holm"] for a in results["arms"]
                if "p_holm" in (a.get("ensemble_vs_real") or {})]
    print(f"null cohort fold-ensemble bootstrap Holm p-values, smallest first: {sorted(ensemble)}")
    assert ensemble and all(p >= 0.05 for p in ensemble), ensemble
