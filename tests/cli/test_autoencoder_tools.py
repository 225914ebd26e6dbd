"""CLI: `medgen traverse`, `medgen anomaly`, `medgen denoise` on a tiny phantom, and `medgen train --classes
--holdout --input-noise` that they rely on (held-out subjects recorded, never scored if they trained)."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medgen.cli.main import app
from medgen.pipelines.site import detect_kind


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    d = tmp_path_factory.mktemp("ph") / "phantom"
    r = invoke("phantom", "--out", d, "--n", 12, "--size", 32, "--seed", 3)
    assert r.exit_code == 0, r.output
    return d


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    p = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    p.write_text("models:\n  vae: {base_width: 4, latent_dim: 8}\n  alpha-gan: {base_width: 4, latent_dim: 8}\n"
                 "  gan: {base_width: 4, latent_dim: 8}\n"
                 "train: {iterations: 3, batch_size: 2, log_every: 1, sample_every: 0, checkpoint_every: 0, "
                 "precision: fp32, ema_decay: 0.0}\ndevice: cpu\n")
    return p


def train(model, phantom, config, out, *extra):
    r = invoke("train", model, "--data", phantom, "--config", config, "--size", 16, "--out", out, *extra)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def cn_run(phantom, config, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "cn"
    summary = train("vae", phantom, config, out, "--classes", "CN", "--holdout", 0.5)
    return out, summary


@pytest.fixture(scope="module")
def all_run(phantom, config, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "all"
    train("vae", phantom, config, out, "--holdout", 0.34, "--input-noise", 0.2)
    return out


def test_train_classes_and_holdout_record_the_split(cn_run):
    out, summary = cn_run
    split = json.loads((out / "split.json").read_text())
    assert split["classes"] == ["CN"] and split["holdout"] == 0.5
    assert not set(split["train"]) & set(split["held_out"])
    assert split["train_per_class"]["MCI"] == split["train_per_class"]["AD"] == 0
    assert split["held_out_per_class"]["CN"] >= 1 and summary["train_subjects"] == len(split["train"])
    ckpt = torch.load(out / "final.pt", weights_only=True)
    assert sorted(ckpt["extra"]["subjects"]) == split["train"]  # the checkpoint says who trained it
    assert "split.json" in (out / "index.html").read_text()


def test_train_refuses_bad_selection(phantom, config, tmp_path):
    r = invoke("train", "vae", "--data", phantom, "--config", config, "--size", 16, "--out", tmp_path / "x",
               "--classes", "XX")
    assert r.exit_code == 1 and "unknown class 'XX'" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    r = invoke("train", "gan", "--data", phantom, "--config", config, "--out", tmp_path / "y", "--input-noise", 0.1)
    assert r.exit_code == 1 and "--input-noise" in r.output and not (tmp_path / "y").exists()


def test_anomaly_scores_only_unseen_subjects(cn_run, phantom, tmp_path):
    run, _ = cn_run
    out = tmp_path / "anomaly"
    r = invoke("anomaly", "--checkpoint", run, "--data", phantom, "--out", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    metrics = json.loads((out / "metrics.json").read_text())
    split = json.loads((run / "split.json").read_text())
    with open(out / "scores.csv") as fh:
        rows = list(csv.DictReader(fh))
    scored = {row["subject"] for row in rows}
    assert scored and not scored & set(split["train"])  # no training subject is scored
    assert metrics["scored_per_class"]["CN"] == split["held_out_per_class"]["CN"]
    assert all(np.isfinite(float(row["error_top"])) and float(row["error_top"]) >= 0 for row in rows)
    for pair in ("CN_vs_MCI", "CN_vs_AD"):
        assert 0.0 <= res["auc"][pair]["error_mean"] <= 1.0
    shares = metrics["regions"]["error"]
    assert 0 < shares["brain_share"]["hippocampus+ventricles"] < 1
    for per in shares["top_share_per_class"].values():
        assert 0.0 <= per["hippocampus+ventricles"] <= 1.0
    maps = sorted((out / "maps").glob("*_error.nii.gz"))
    assert len(maps) == len(rows)
    ckpt = torch.load(run / "final.pt", weights_only=True)
    img = nib.load(str(maps[0]))
    assert img.shape == (16, 16, 16) and np.allclose(img.affine, ckpt["affine"].numpy())
    for name in ("overlays.png", "roc.png", "scores.png", "index.html"):
        assert (out / name).is_file()
    assert detect_kind(out) == "anomaly" and "ROC AUC" in (out / "index.html").read_text()
    # phantom data: the ROI scores read the affected regions, and lead
    assert metrics["headline_score"] == "roi_deficit" and "hippocampus+ventricles" in metrics["settings"]["roi"]
    assert {"roi_deficit", "roi_deficit_z"} <= set(res["auc"]["CN_vs_AD"])
    assert all(np.isfinite(float(row["roi_deficit"])) for row in rows)
    assert len(sorted((out / "maps").glob("*_deficit.nii.gz"))) == len(rows)


def test_anomaly_roi_mask(cn_run, phantom, tmp_path):
    run, _ = cn_run
    ckpt = torch.load(run / "final.pt", weights_only=True)
    mask = np.zeros((16, 16, 16), dtype=np.uint8)
    mask[4:8, 4:8, 4:8] = 1
    good = tmp_path / "roi.nii.gz"
    nib.save(nib.Nifti1Image(mask, ckpt["affine"].numpy()), str(good))
    out = tmp_path / "a"
    r = invoke("anomaly", "--checkpoint", run, "--data", phantom, "--out", out, "--roi", good, "--no-maps")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["settings"]["roi"] == "mask roi.nii.gz" and m["settings"]["roi_voxels"] == 64
    bad = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), dtype=np.uint8), np.eye(4)), str(bad))
    for roi, msg in ((bad, "shape (8, 8, 8)"), (tmp_path / "missing.nii.gz", "no such file")):
        r = invoke("anomaly", "--checkpoint", run, "--data", phantom, "--out", tmp_path / "b", "--roi", roi)
        assert r.exit_code == 1 and msg in r.output and str(roi.name) in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "b").exists()


def test_anomaly_bad_inputs_are_one_line(all_run, cn_run, tmp_path):
    r = invoke("anomaly", "--checkpoint", all_run, "--out", tmp_path / "a")
    assert r.exit_code == 1 and "normal class only" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()
    r = invoke("anomaly", "--checkpoint", cn_run[0], "--out", tmp_path / "b", "--normal", "AD")
    assert r.exit_code == 1 and "did not train on AD" in r.output and not (tmp_path / "b").exists()


def test_denoise_reports_psnr_and_ssim_per_level(all_run, phantom, tmp_path):
    out = tmp_path / "dn"
    r = invoke("denoise", "--checkpoint", all_run, "--data", phantom, "--out", out, "--levels", "0.05,0.2",
               "--device", "cpu")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["input_noise_trained"] == 0.2 and [row["level"] for row in m["levels"]] == [0.05, 0.2]
    low, high = m["levels"]
    assert low["psnr_noisy"] > high["psnr_noisy"]  # more noise, lower PSNR of the noisy input
    assert abs(low["psnr_noisy"] - 20 * np.log10(2 / (0.05 * 2))) < 0.5  # SD 0.1 on a range of 2: ~26 dB
    assert all(0 <= row["ssim_denoised"] <= 1 for row in m["levels"])
    split = json.loads((all_run / "split.json").read_text())
    assert m["held_out_subjects"] == len(split["held_out"])
    ex = sorted((out / "examples").glob("*_noise-20_denoised.nii.gz"))
    assert ex and nib.load(str(ex[0])).shape == (16, 16, 16)
    assert detect_kind(out) == "denoise" and "PSNR gain" in (out / "index.html").read_text()
    r = invoke("denoise", "--checkpoint", all_run, "--out", tmp_path / "bad", "--levels", "0,0.1")
    assert r.exit_code == 1 and "--levels" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_traverse_writes_series_and_strips(all_run, phantom, tmp_path):
    out = tmp_path / "tr"
    r = invoke("traverse", "--checkpoint", all_run, "--data", phantom, "--out", out, "--steps", 3, "--dims", 2,
               "--device", "cpu")
    assert r.exit_code == 0, r.output
    info = json.loads((out / "traverse.json").read_text())
    assert info["classes"] == ["CN", "MCI", "AD"] and len(info["class_steps"]) == 5  # CN, CN>MCI, MCI, MCI>AD, AD
    assert len(info["files"]["subjects"]) == 3 and len(info["files"]["dims"]) == 2 * 3
    assert info["subject_a"]["class"] == "CN" and info["subject_b"]["class"] == "AD"
    ckpt = torch.load(all_run / "final.pt", weights_only=True)
    first = nib.load(str(out / info["files"]["classes"][0]))
    assert np.allclose(first.affine, ckpt["affine"].numpy()) and first.shape == (16, 16, 16)
    vols = [np.asarray(nib.load(str(out / f)).dataobj) for f in info["files"]["classes"]]
    assert not np.allclose(vols[0], vols[-1])  # the class condition changes the volume
    for name in ("subjects.png", "classes.png", "dims.png", "index.html"):
        assert (out / name).is_file()
    assert detect_kind(out) == "traverse"
    r = invoke("traverse", "--checkpoint", all_run, "--data", phantom, "--out", tmp_path / "bad",
               "--subject-a", "sub-nobody")
    assert r.exit_code == 1 and "sub-nobody" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_commands_refuse_a_model_without_encoder(phantom, config, tmp_path):
    gan = tmp_path / "gan"
    train("gan", phantom, config, gan)
    for cmd in ("traverse", "anomaly", "denoise"):
        r = invoke(cmd, "--checkpoint", gan, "--out", tmp_path / cmd)
        assert r.exit_code == 1 and "needs an autoencoder" in r.output, (cmd, r.output)
        assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / cmd).exists()


def test_alpha_gan_encoder_and_generator_score_anomalies(phantom, config, tmp_path):
    run = tmp_path / "ag"
    train("alpha-gan", phantom, config, run, "--classes", "CN", "--holdout", 0.5)
    out = tmp_path / "an"
    r = invoke("anomaly", "--checkpoint", run, "--data", phantom, "--out", out, "--no-maps")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"] == "alpha-gan" and not (out / "maps").exists()
    assert 0.0 <= m["auc"]["CN_vs_AD"]["code_distance"] <= 1.0
    site = tmp_path / "site"
    r = invoke("report", out, "--out", site)
    assert r.exit_code == 0, r.output
    assert "anomaly" in (site / "index.html").read_text()
