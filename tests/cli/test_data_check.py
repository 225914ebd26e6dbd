"""`medgen data-check`: summary on stdout, and every bad input ends in exit 1 with one stderr line."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medgen.cli.main import app

AFFINE = np.diag([2.0, 1.5, 2.5, 1.0])


def blob(shape=(20, 24, 18), seed=0):
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt(sum(g**2 for g in grids))
    return (np.clip(1 - r, 0, None) * 100 + np.random.default_rng(seed).random(shape)).astype(np.float32)


@pytest.fixture
def dataset(tmp_path):
    """Eight scans (two per subject) of two CN and two AD subjects in a CSV table."""
    rows = ["image,label,subject"]
    for i in range(8):
        nib.save(nib.Nifti1Image(blob(seed=i), AFFINE), tmp_path / f"s{i}.nii.gz")
        rows.append(f"s{i}.nii.gz,{['CN', 'AD'][i % 2]},sub{i % 4}")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def run(*args):
    return CliRunner().invoke(app, ["data-check", *map(str, args)])


def assert_one_error_line(result, *needles):
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_summary_tables_and_json(dataset):
    r = run("--data", dataset / "data.csv", "--group-column", "subject")
    assert r.exit_code == 0, r.output
    assert "Classes" in r.stdout and "CN" in r.stdout and "20x24x18 (8)" in r.stdout
    assert "2x1.5x2.5 (8)" in r.stdout and "RAS (8)" in r.stdout and "no problems found" in r.stdout
    assert r.stderr == ""
    r = run("--data", dataset / "data.csv", "--group-column", "subject", "--json", "--folds", "2")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["scans"] == 8 and summary["subjects"] == 4 and summary["ok"] is True
    assert summary["classes"] == [{"name": "CN", "subjects": 2, "scans": 4}, {"name": "AD", "subjects": 2, "scans": 4}]
    assert summary["notes"] == []
    assert summary["intensity"]["max"] > 50


def _edit_table(dataset, line, new):
    path = dataset / "data.csv"
    lines = path.read_text().splitlines()
    lines[line - 1] = new
    path.write_text("\n".join(lines) + "\n")
    return path


def test_missing_file(dataset):
    path = _edit_table(dataset, 3, "gone.nii.gz,AD,sub9")
    assert_one_error_line(run("--data", path), "data.csv, line 3: image file not found", "gone.nii.gz")


def test_missing_and_unknown_label(dataset):
    path = _edit_table(dataset, 4, "s2.nii.gz,,sub1")
    assert_one_error_line(run("--data", path), "data.csv, line 4: missing label")
    (dataset / "l.json").write_text(json.dumps({"labels": {"0": "CN", "1": "AD"}, "training": [
        {"image": "s0.nii.gz", "label": "CN"}, {"image": "s1.nii.gz", "label": "MCI"}]}))
    assert_one_error_line(run("--data", dataset / "l.json"), "l.json, training[1]: unknown label 'MCI'")


def test_missing_column_names_the_columns(dataset):
    r = run("--data", dataset / "data.csv", "--label-column", "diagnosis")
    assert_one_error_line(r, 'no column "diagnosis"', "columns: image, label, subject")


def test_unreadable_table_and_unknown_data(dataset):
    (dataset / "bad.tsv").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xff\x00")
    assert_one_error_line(run("--data", dataset / "bad.tsv"), "bad.tsv: cannot read table")
    assert_one_error_line(run("--data", dataset / "nothing.csv"), "nothing.csv: no such file or folder")
    assert_one_error_line(run("--data", dataset), "not a phantom folder, datalist JSON, CSV/TSV table or scenes folder")
    assert_one_error_line(run(), "--data is required")


@pytest.mark.parametrize(
    "name, writer, needle",
    [
        ("corrupt.nii.gz", lambda p: p.write_bytes(b"\x1f\x8b\x08\x00broken" * 10), "cannot read image"),
        ("flat.nii.gz", lambda p: nib.save(nib.Nifti1Image(blob((20, 24, 1)), AFFINE), p), "is a 2D image"),
        ("multi.nii.gz", lambda p: nib.save(nib.Nifti1Image(np.stack([blob()] * 2, -1), AFFINE), p), "is a 4D image"),
        ("nan.nii.gz", lambda p: nib.save(nib.Nifti1Image(np.where(blob() > 50, np.nan, blob()).astype(np.float32),
                                                          AFFINE), p), "NaN/Inf voxels"),
    ],
)
def test_bad_images(dataset, name, writer, needle):
    writer(dataset / name)
    path = _edit_table(dataset, 2, f"{name},CN,sub0")
    r = run("--data", path)
    assert_one_error_line(r, name, needle)
    assert "Problems (1)" in r.stdout  # the summary still lists what was found


def test_too_few_subjects_for_folds(dataset):
    r = run("--data", dataset / "data.csv", "--group-column", "subject", "--folds", "6")
    assert_one_error_line(r, "class CN has 2 subjects; 6 folds need at least 6", "+1 more problem,")
    # without --group-column every scan is its own subject: 4 per class, still too few for 6 folds
    r = run("--data", dataset / "data.csv", "--folds", "5", "--json")
    assert_one_error_line(r, "class CN has 4 subjects; 5 folds need at least 5")
    assert json.loads(r.stdout)["ok"] is False


def test_subprocess_exit_codes(dataset):
    env = {**os.environ, "MEDGEN_QUIET": "1"}
    ok = subprocess.run([sys.executable, "-m", "medgen", "data-check", "--data", str(dataset / "data.csv"), "--json"],
                        capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["scans"] == 8
    path = _edit_table(dataset, 5, "s3.nii.gz,XX,sub1")
    bad = subprocess.run([sys.executable, "-m", "medgen", "data-check", "--data", str(path), "--folds", "2"],
                         capture_output=True, text=True, env=env, timeout=300)
    # without a labels map a typo is a new class of its own, which the fold check catches
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == ["error: class XX has 1 subject; 2 folds need at least 2"]
    assert "XX" in bad.stdout


def test_scenes_folder_is_dispatched(tmp_path):
    scenes = pytest.importorskip("medgen.data.scenes")
    scenes.write_scenes(tmp_path / "sc", n=2, seed=0, size=32)
    r = run("--data", tmp_path / "sc", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["kind"] == "scenes" and summary["items"] == 2 and summary["shape"] == [3, 32, 32]


def test_subject_with_mixed_labels_is_reported_and_counted_once(dataset):
    # sub0's second scan becomes AD (a conversion): reported, counted once (CN, its lowest tied label)
    _edit_table(dataset, 6, "s4.nii.gz,AD,sub0")
    r = run("--data", dataset / "data.csv", "--group-column", "subject", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert [c["subjects"] for c in summary["classes"]] == [2, 2] and summary["subjects"] == 4
    assert len(summary["notes"]) == 1 and "sub0" in summary["notes"][0] and "CN, AD" in summary["notes"][0]
    r = run("--data", dataset / "data.csv", "--group-column", "subject")
    assert "note: subject sub0" in r.stdout
