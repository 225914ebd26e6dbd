"""Smoke runs of the benchmark scripts at tiny settings (the benchmarks themselves are not tests).

The two runs are marked slow: `pytest -m slow tests/test_benchmarks.py`.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~10 s on a quiet 2-core CPU, far more under load: kept out of the default suite
def test_conv3d_benchmark_tiny_run_writes_json(tmp_path, capsys):
    conv3d = _load("conv3d")
    out = tmp_path / "conv3d.json"
    payload = conv3d.main(["--device", "cpu", "--quick", "--models", "gan", "--base-width", "2", "--size", "16",
                           "--batches", "1", "--iters", "1", "--precisions", "fp32", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["layer_source"].startswith("models")  # traced from the real model, not the fallback
    assert data["results"] and all(r["ms"] > 0 for r in data["results"])
    assert {r["pass"] for r in data["results"]} == {"fwd", "dgrad", "wgrad"}
    assert data["summary"][0]["speedup_vs_fp32"] == pytest.approx(1.0)
    assert data["peak"]["gemm_tflops"]["fp32"] > 0
    assert payload["upsampling"], "the generator's up-sampling stages are compared"
    assert "conv3d layers" in capsys.readouterr().out


def test_conv3d_flop_count_matches_definition():
    conv3d = _load("conv3d")
    spec = conv3d.specs_from_design(base_width=8, size=64)
    d0 = next(s for s in spec if s.name == "d0")  # 1 -> 8 channels, k4 s2: 64^3 -> 32^3
    assert d0.out_spatial == (32, 32, 32)
    assert d0.flops(2) == 2 * 2 * 8 * 32**3 * 1 * 4**3
    g1 = next(s for s in spec if s.name == "g1")  # transposed 64 -> 32 channels, 4^3 -> 8^3
    assert g1.out_spatial == (8, 8, 8)
    assert g1.flops(1) == 2 * 64 * 4**3 * 32 * 4**3


@pytest.mark.slow
def test_train_step_benchmark_tiny_run_checks_losses(tmp_path):
    train_step = _load("train_step")
    out = tmp_path / "train.json"
    train_step.main(["--device", "cpu", "--quick", "--models", "gan", "--base-width", "2", "--size", "16",
                     "--iters", "1", "--warmup", "0", "--rungs", "2", "--json", str(out)])
    data = json.loads(out.read_text())
    rows = [r for r in data["results"] if "error" not in r]
    assert rows[0]["setting"] == "eager fp32" and rows[0]["speedup_vs_baseline"] == pytest.approx(1.0)
    assert all(r["losses_match"] for r in rows), [(r["setting"], r["loss_error_over_tol"]) for r in rows]
    assert "medgen default" in [r["setting"] for r in rows]
