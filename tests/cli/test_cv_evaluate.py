"""CLI: `medgen cv-evaluate` smoke run with every arm on user data (two custom classes, repeated scans)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medgen.cli.main import app

AFFINE = np.array([[6.0, 0, 0, -45], [0, 6.0, 0, -45], [0, 0, 6.0, -45], [0, 0, 0, 1]])


pytestmark = pytest.mark.usefixtures("one_thread")


def _table(d, n_subjects, scans=2):
    """A TSV table of 16^3 NIfTI volumes: classes healthy/tumour, `scans` scans per subject."""
    rng = np.random.default_rng(0)
    rows = ["path\tdiagnosis\tparticipant"]
    for i in range(n_subjects):
        label = ["healthy", "tumour"][i % 2]
        for s in range(scans):
            x = rng.random((16, 16, 16)).astype(np.float32) + 0.5 * (i % 2)
            name = f"p{i:02d}_s{s}.nii.gz"
            nib.save(nib.Nifti1Image(x, AFFINE), str(d / name))
            rows.append(f"{name}\t{label}\tP{i:02d}")
    (d / "table.tsv").write_text("\n".join(rows) + "\n")
    return d / "table.tsv"


def _args(table, out, *extra):
    return ["cv-evaluate", "--out", str(out), "--config", "smoke", "--data", str(table),
            "--image-column", "path", "--label-column", "diagnosis", "--group-column", "participant", *extra]


def test_cv_evaluate_smoke_every_arm(tmp_path):
    table = _table(tmp_path, 16)
    runner = CliRunner()
    res = runner.invoke(app, _args(table, tmp_path / "cv", "--models", "vae,gan,alpha-gan"))
    assert res.exit_code == 0, res.output
    out = tmp_path / "cv"
    results = json.loads((out / "results.json").read_text())
    keys = [a["arm"] for a in results["arms"]]
    for g in ("vae", "gan", "alpha-gan"):
        assert {f"{g}_f50", f"{g}_f50_aug", f"tstr_{g}"} <= set(keys)
    assert keys[:3] == ["real", "linear", "real_aug"] and results["class_names"] == ["healthy", "tumour"]
    assert "oracle_f50" not in keys and "permuted_f50" in keys  # a table of NIfTI files is not a phantom
    assert "tstr_gan" in keys and "test_vs_real" in results["arms"][1]
    for name in ("results.csv", "results.md", "accuracy.png", "confusion.png", "splits.json"):
        assert (out / name).is_file()
    assert "real only" in res.stdout  # the table is printed
    # repeated scans of a participant never span roles
    splits = json.loads((out / "splits.json").read_text())
    for f in splits["folds"]:
        assert not set(f["train"]) & set(f["val"]) and not set(f["train"]) & set(splits["test"])

    # --merge re-aggregates a finished run; a second run into it is refused without --resume/--overwrite
    res = runner.invoke(app, ["cv-evaluate", "--out", str(out), "--merge"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, _args(table, out, "--models", "vae,gan,alpha-gan"))
    assert res.exit_code == 1 and "already exists" in res.output


def test_cv_evaluate_fold_jobs_then_merge(tmp_path):
    table = _table(tmp_path, 16, scans=1)
    runner = CliRunner()
    out = tmp_path / "cv"
    base = ["--models", "gan", "--fractions", "0.5"]
    res = runner.invoke(app, _args(table, out, *base, "--fold", "1"))
    assert res.exit_code == 0, res.output
    assert (out / "fold_1" / "fold.json").is_file() and not (out / "results.json").exists()
    res = runner.invoke(app, ["cv-evaluate", "--out", str(out), "--merge"])
    assert res.exit_code == 1 and "fold(s) 0 not finished" in res.output
    res = runner.invoke(app, _args(table, out, *base, "--fold", "0"))
    assert res.exit_code == 0, res.output
    assert (out / "results.json").is_file()  # merged automatically once every fold is there


def test_cv_evaluate_too_few_subjects_is_one_line(tmp_path):
    table = _table(tmp_path, 6, scans=1)  # 3 subjects per class
    res = CliRunner().invoke(app, _args(table, tmp_path / "cv", "--folds", "4"))
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: class 'healthy' has 3 subjects"), res.output
    assert not (tmp_path / "cv").exists()
