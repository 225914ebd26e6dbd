"""CLI: `medgen train` for each generative model, `medgen synth`, `medgen evaluate-synth`, error paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medgen.cli.main import app

AFFINE = np.array([[6.0, 0, 0, -45], [0, 6.0, 0, -45], [0, 0, 6.0, -45], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Six 16^3 NIfTI volumes, two per class, listed in a MONAI datalist."""
    d = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    items = []
    for i in range(6):
        x = rng.random((16, 16, 16)).astype(np.float32) + (i % 3)
        nib.save(nib.Nifti1Image(x, AFFINE), str(d / f"s{i}.nii.gz"))
        items.append({"image": f"s{i}.nii.gz", "label": ["CN", "MCI", "AD"][i % 3]})
    (d / "datalist.json").write_text(json.dumps({"training": items}))
    return d / "datalist.json"


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """The smoke preset's spirit at 16^3: tiny widths, a few iterations."""
    p = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    p.write_text(
        "data: {size: 16}\n"
        "models:\n"
        "  vae: {base_width: 4, latent_dim: 8}\n"
        "  gan: {base_width: 4, latent_dim: 8}\n"
        "  alpha-gan: {base_width: 4, latent_dim: 8}\n"
        "steps:\n"
        "  gan: {n_critic: 2}\n"
        "train: {log_every: 1, sample_every: 2, checkpoint_every: 1, ema_decay: 0.9}\n"
    )
    return p


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def train_args(model, data, out, config, *extra):
    return ["train", model, "--data", data, "--out", out, "--config", config, "--iterations", 2,
            "--batch-size", 2, "--device", "cpu", "--precision", "fp32", *extra]


@pytest.mark.parametrize("model", ["vae", "gan", "alpha-gan"])
def test_train_each_model(model, tiny, config, tmp_path):
    out = tmp_path / "run"
    r = invoke(*train_args(model, tiny, out, config))
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["model"] == model and summary["iterations"] == 2
    assert {"final.pt", "last.pt", "log.csv", "config.yaml", "samples", "loss.png"} <= {p.name for p in out.iterdir()}
    assert list((out / "samples").glob("*.png"))
    # existing folder refused; --resume continues to a longer schedule
    r = invoke(*train_args(model, tiny, out, config))
    assert r.exit_code == 1 and "already exists" in r.output
    r = invoke(*train_args(model, tiny, out, config, "--resume", "--iterations", 3))
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["iterations"] == 3


def test_synth_and_evaluate(tiny, config, tmp_path):
    run = tmp_path / "run"
    assert invoke(*train_args("vae", tiny, run, config)).exit_code == 0
    r = invoke("synth", "--checkpoint", run, "--out", tmp_path / "syn", "--n", 3, "--seed", 2, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["per_class"] == {"CN": 1, "MCI": 1, "AD": 1}
    assert (tmp_path / "syn" / "montage.png").stat().st_size > 1000
    dl = json.loads((tmp_path / "syn" / "datalist.json").read_text())
    vol = nib.load(tmp_path / "syn" / dl["training"][0]["image"])
    assert vol.shape == (16, 16, 16)
    assert not np.allclose(vol.affine, np.eye(4))
    real = nib.load(tiny.parent / "s0.nii.gz").header  # nibabel's defaults: sform 2 (aligned), qform 0, no units
    assert (int(vol.header["sform_code"]), int(vol.header["qform_code"])) == (int(real["sform_code"]),
                                                                          int(real["qform_code"])) == (2, 0)
    assert vol.header.get_xyzt_units()[0] == "mm"  # the affine is in mm even where the data did not say so
    r = invoke("synth", "--checkpoint", run, "--out", tmp_path / "bad", "--n", 3, "--class", "XX")
    assert r.exit_code == 1 and "unknown class 'XX'" in r.output and not (tmp_path / "bad").exists()
    r = invoke("evaluate-synth", "--checkpoint", run, "--data", tiny, "--config", config, "--n", 2, "--pairs", 1,
               "--classifier-iterations", 1, "--device", "cpu", "--json", tmp_path / "m.json")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().startswith("{"), r.output[-2000:]
    result = json.loads(r.stdout)
    assert set(result["classes"]) == {"CN", "MCI", "AD"}
    assert json.loads((tmp_path / "m.json").read_text())["classes"] == result["classes"]
    for key in ("class_agreement", "two_sample_auc", "precision", "coverage"):
        assert key in result["overall"] and key in result["classes"]["AD"]
    fid = tmp_path / "fid"
    r = invoke("evaluate-synth", "--checkpoint", run, "--data", tiny, "--config", config, "--n", 2, "--pairs", 1,
               "--classifier-iterations", 1, "--device", "cpu", "--out", fid)
    assert r.exit_code == 0, r.output
    assert {"metrics.json", "metrics.md", "montage.png", "fidelity.png"} <= {p.name for p in fid.iterdir()}
    r = invoke("evaluate-synth", "--checkpoint", run, "--data", tiny, "--config", config, "--out", fid)
    assert r.exit_code == 1 and "already exists" in r.output


def test_train_max_minutes(tiny, config, tmp_path):
    out = tmp_path / "run"
    r = invoke(*train_args("vae", tiny, out, config, "--iterations", 1000, "--max-minutes", 0.01))
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["stopped_by_time"] and summary["iterations"] < 1000
    r = invoke(*train_args("vae", tiny, tmp_path / "r2", config, "--max-minutes", 0))
    assert r.exit_code == 2


def test_errors_are_one_line(tiny, tmp_path):
    r = invoke("train", "nosuch", "--data", tiny, "--out", tmp_path / "r")  # a usage error: exit 2
    assert r.exit_code == 2 and "nosuch" in r.output and "alpha-gan" in r.output and "Traceback" not in r.output
    r = invoke("train", "classifier", "--data", tiny, "--out", tmp_path / "r")  # trained by cv-evaluate
    assert r.exit_code == 2 and "classifier" in r.output
    (tmp_path / "evil.pt").write_bytes(b"garbage")
    r = invoke("synth", "--checkpoint", tmp_path / "evil.pt", "--out", tmp_path / "s", "--n", 1)
    assert r.exit_code == 1 and "corrupt" in r.output


def test_train_as_subprocess(tiny, config, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, MEDGEN_QUIET="1")
    cmd = [sys.executable, "-m", "medgen", *[str(a) for a in train_args("vae", tiny, out, config)]]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["checkpoint"] == str(out / "final.pt")


@pytest.mark.slow  # builds a phantom cohort (~30 s on 2 busy cores)
def test_train_without_data_uses_cached_phantom(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDGEN_CACHE_DIR", str(tmp_path / "cache"))
    cfg = tmp_path / "ph.yaml"
    cfg.write_text("phantom: {n: 3, size: 16}\ndata: {size: 16}\nmodels: {vae: {base_width: 4, latent_dim: 8}}\n"
                   "train: {iterations: 1, batch_size: 3, sample_every: 0}\n")
    r = invoke("train", "vae", "--out", tmp_path / "run", "--config", cfg, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 1  # one cohort (plus its lock file)
    from medgen.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "run")["class_names"] == ["CN", "MCI", "AD"]
