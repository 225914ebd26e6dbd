"""The phantom cohort: folder format, determinism, class effects, Jacobian, separability, CLI."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medgen.data import phantom as ph
from medgen.data.anatomy import load_atlas
from medgen.errors import MedgenError
from medgen.geometry import mni_affine

SMALL = 32  # 6 mm voxels: the same field of view as 64^3, 8x fewer voxels


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _table(folder: Path) -> list[dict[str, str]]:
    with open(folder / "participants.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """90 subjects (30 per class) at 32^3."""
    return ph.generate_cohort(tmp_path_factory.mktemp("phantom") / "cohort", n=90, seed=0, size=SMALL)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = ph.generate_cohort(tmp_path / "a", n=4, seed=5, size=SMALL)
    b = ph.generate_cohort(tmp_path / "b", n=4, seed=5, size=SMALL)
    c = ph.generate_cohort(tmp_path / "c", n=4, seed=6, size=SMALL)
    da, db, dc = _digest(a), _digest(b), _digest(c)
    # root: datalist, phantom.json, BIDS files (description, participants tsv/json, README, .bidsignore),
    # the .medgen marker; derivatives/tissue: description, README, dseg.tsv; two volumes per subject
    assert len(da) == 8 + 3 + 2 * 4
    assert da == db
    images = [k for k in da if k.endswith("_T1w.nii.gz")]
    assert all(da[k] != dc[k] for k in images)


def test_parallel_rendering_gives_the_same_bytes(tmp_path):
    one = ph.generate_cohort(tmp_path / "one", n=9, seed=2, size=SMALL, workers=1)
    two = ph.generate_cohort(tmp_path / "two", n=9, seed=2, size=SMALL, workers=2)
    assert _digest(one) == _digest(two)


def test_folder_format(cohort):
    datalist = json.loads((cohort / "datalist.json").read_text())
    assert datalist["labels"] == {"0": "CN", "1": "MCI", "2": "AD"}
    assert datalist["numTraining"] == 90 == len(datalist["training"])
    labels = [e["label"] for e in datalist["training"]]
    assert all(isinstance(x, int) for x in labels)
    assert np.bincount(labels).tolist() == [30, 30, 30]
    first = datalist["training"][0]
    assert (cohort / first["image"]).is_file() and (cohort / first["tissue"]).is_file()
    assert first["image"] == f"{first['subject']}/anat/{first['subject']}_T1w.nii.gz"
    assert first["tissue"] == f"derivatives/tissue/{first['subject']}/anat/{first['subject']}_dseg.nii.gz"

    rows = _table(cohort)
    assert list(rows[0])[0] == "participant_id"  # BIDS: the first column
    assert [r["participant_id"] for r in rows] == [e["subject"] for e in datalist["training"]]
    assert [r["label"] for r in rows] == [ph.DEFAULT_CLASS_NAMES[x] for x in labels]
    for key in ("age", "sex", "hippocampus_ml", "ventricles_ml", "gm_ml", "wm_ml", "csf_ml"):
        assert key in rows[0]
    assert all(float(r["min_jacobian"]) > 0 for r in rows)

    meta = json.loads((cohort / "phantom.json").read_text())
    assert meta["parameters"] == {"n": 90, "seed": 0, "effect_scale": 1.0, "size": SMALL}

    img = nib.load(cohort / first["image"])
    seg = nib.load(cohort / first["tissue"])
    assert img.shape == (SMALL, SMALL, SMALL) and img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.affine, mni_affine(SMALL))
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) == {0, 1, 2, 3}


def test_remainder_classes_balanced():
    counts = np.bincount(ph.class_labels(10, 0)).tolist()
    assert counts == [4, 3, 3]
    assert ph.class_labels(10, 0) == ph.class_labels(10, 0) != ph.class_labels(10, 1)


def test_default_size_subject_is_3mm_ras_float32():
    atlas = load_atlas(64)
    affine = atlas.affine
    assert np.allclose(np.diag(affine)[:3], 3.0) and not np.allclose(affine, np.eye(4))
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    # MNI origin (anterior commissure) lies inside the grid, near its centre
    origin_vox = np.linalg.inv(affine) @ np.array([0, 0, 0, 1.0])
    assert np.all(np.abs(origin_vox[:3] - 31.5) < 8)
    rng = np.random.default_rng([0, 1])
    subject = ph.make_subject(atlas, ph.draw_subject(rng, "sub-0001", 2, 1.0), rng)
    assert subject.image.shape == (64, 64, 64) and subject.image.dtype == np.float32
    assert np.isfinite(subject.image).all() and 0.0 <= subject.image.min() and subject.image.max() < 2.0
    assert subject.tissue.shape == (64, 64, 64) and subject.tissue.max() == 3
    # plausible adult volumes (ml) measured from the warped maps
    assert 1300 < subject.volumes["icv_ml"] < 2600
    assert 3 < subject.volumes["hippocampus_ml"] < 9


def test_class_effect_direction_paired():
    """Same subject (same stream) with CN / MCI / AD mean effects: hippocampus shrinks, ventricles grow."""
    atlas = load_atlas(SMALL)
    base = ph.draw_subject(np.random.default_rng([1, 1]), "sub", 0, 1.0)
    vols = []
    for label in range(3):
        effects = {k: (0.0, mci, ad)[label] for k, (mci, ad, _) in ph.EFFECTS.items()}
        params = dataclasses.replace(base, label=label, effects=effects)
        vols.append(ph.make_subject(atlas, params, np.random.default_rng([1, 2])).volumes)
    hip = [v["hippocampus_ml"] for v in vols]
    ven = [v["ventricles_ml"] for v in vols]
    gm = [v["gm_ml"] for v in vols]
    assert hip[0] > hip[1] > hip[2]
    assert ven[0] < ven[1] < ven[2]
    assert gm[0] > gm[1] > gm[2]
    # the measured AD hippocampal change is of the intended size (target log change -0.27)
    assert -0.40 < np.log(hip[2] / hip[0]) < -0.15


def test_group_means(cohort):
    rows = _table(cohort)
    by_class = {c: [r for r in rows if r["label"] == c] for c in ph.DEFAULT_CLASS_NAMES}
    hip = [np.mean([float(r["hippocampus_ml"]) for r in by_class[c]]) for c in ph.DEFAULT_CLASS_NAMES]
    ven = [np.mean([np.log(float(r["ventricles_ml"])) for r in by_class[c]]) for c in ph.DEFAULT_CLASS_NAMES]
    assert hip[0] > hip[1] > hip[2]
    assert ven[0] < ven[1] < ven[2]


def test_measured_volumes_follow_drawn_effects(cohort):
    """Ground truth tracks the drawn log-volume change (slope near 1) once head size is removed."""
    rows = _table(cohort)
    scale = 3 * np.log([float(r["head_scale"]) for r in rows])
    for region, column in (("hippocampus", "hippocampus_ml"), ("ventricles", "ventricles_ml")):
        x = np.array([float(r[f"log_effect_{region}"]) for r in rows])
        y = np.log([float(r[column]) for r in rows]) - scale
        slope = np.polyfit(x, y, 1)[0]
        assert 0.6 < slope < 1.3, (region, slope)


def test_separable_but_overlapping(cohort):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows = _table(cohort)
    x = np.array([[float(r[c]) for c in ph.VOLUME_COLUMNS] + [float(r["age"])] for r in rows])
    y = np.array([ph.DEFAULT_CLASS_NAMES.index(r["label"]) for r in rows])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    acc = cross_val_score(model, x, y, cv=StratifiedKFold(5, shuffle=True, random_state=0)).mean()
    assert 0.45 < acc < 0.9, acc


def test_jacobian_check():
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((3, 24, 24, 24))
    target = np.zeros((24, 24, 24))
    target[8:16, 8:16, 8:16] = -0.5  # a shrinking block
    v = ph.velocity_from_log_jacobian(target, smooth_vox=1.0, noise=noise * 20, noise_smooth_vox=3.0)
    disp = ph.exp_velocity(v)
    det = ph.jacobian_determinant(disp)
    assert ph.check_jacobian(disp) == pytest.approx(det.min()) and det.min() > 0
    assert det[12, 12, 12] < 1.0  # the block shrinks
    # a folding map (x -> -x along one axis) is refused
    fold = np.zeros((3, 8, 8, 8))
    fold[0] = -2.0 * np.arange(8)[:, None, None]
    with pytest.raises(MedgenError, match="det J"):
        ph.check_jacobian(fold)


def test_bad_parameters(tmp_path):
    for kwargs in ({"n": 2}, {"n": -1}, {"seed": -1}, {"size": 15}, {"effect_scale": float("nan")}):
        with pytest.raises(MedgenError):
            ph.generate_cohort(tmp_path / "x", **{"n": 3, "size": SMALL, **kwargs})
    assert not any(tmp_path.iterdir())


def test_ensure_cohort_reuses_cache(tmp_path):
    a = ph.ensure_cohort(tmp_path, n=3, seed=2, effect_scale=1.0, size=SMALL)
    stamp = (a / "datalist.json").stat().st_mtime_ns
    assert ph.ensure_cohort(tmp_path, n=3, seed=2, effect_scale=1.0, size=SMALL) == a
    assert (a / "datalist.json").stat().st_mtime_ns == stamp
    b = ph.ensure_cohort(tmp_path, n=3, seed=3, effect_scale=1.0, size=SMALL)
    assert b != a and ph.read_parameters(b)["seed"] == 3


def test_ensure_cohort_reuses_and_regenerates_a_cache_from_before_the_marker(tmp_path):
    """Cohorts cached before output folders carried .medgen are medgen's own (they hold its phantom.json)."""
    a = ph.ensure_cohort(tmp_path, n=3, seed=2, size=SMALL)
    (a / ".medgen").unlink()
    stamp = (a / "datalist.json").stat().st_mtime_ns
    assert ph.ensure_cohort(tmp_path, n=3, seed=2, size=SMALL) == a  # reused as it is
    assert (a / "datalist.json").stat().st_mtime_ns == stamp
    meta = json.loads((a / "phantom.json").read_text())
    (a / "phantom.json").write_text(json.dumps({**meta, "version": "0"}))  # an older generator's cohort
    assert ph.ensure_cohort(tmp_path, n=3, seed=2, size=SMALL) == a  # regenerated, not refused
    assert ph.read_parameters(a)["seed"] == 2 and (a / ".medgen").is_file()


def test_ensure_cohort_refuses_a_foreign_folder_in_the_cache(tmp_path):
    folder = tmp_path / f"phantom-n3-seed2-es1-s{SMALL}"
    folder.mkdir()
    (folder / "precious.txt").write_text("x")
    with pytest.raises(MedgenError, match="not written by medgen"):
        ph.ensure_cohort(tmp_path, n=3, seed=2, size=SMALL)
    assert (folder / "precious.txt").is_file()


def test_ensure_cohort_concurrent_callers_generate_once(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    calls = []
    real = ph.generate_cohort

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ph, "generate_cohort", counting)
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: ph.ensure_cohort(tmp_path, n=3, seed=4, size=SMALL), range(2)))
    assert paths[0] == paths[1] and len(calls) == 1
    assert ph.read_parameters(paths[0])["seed"] == 4


def test_cli(tmp_path):
    from typer.testing import CliRunner

    from medgen.cli.main import app

    runner = CliRunner()
    out = tmp_path / "cohort"
    result = runner.invoke(
        app, ["phantom", "--out", str(out), "--n", "3", "--seed", "1", "--size", str(SMALL)]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["subjects_per_class"] == {"CN": 1, "MCI": 1, "AD": 1}
    assert summary["seconds"] > 0
    before = _digest(out)

    again = runner.invoke(app, ["phantom", "--out", str(out), "--n", "3", "--size", str(SMALL)])
    assert again.exit_code == 1 and "already exists" in again.output
    assert _digest(out) == before

    bad = runner.invoke(app, ["phantom", "--out", str(tmp_path / "bad"), "--n", "2"])
    assert bad.exit_code == 1 and "error:" in bad.output and "Traceback" not in bad.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort"]  # nothing half-written


def test_error_mid_generation_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise MedgenError("deformation folds space")

    monkeypatch.setattr(ph, "make_subject", broken)
    with pytest.raises(MedgenError):
        ph.generate_cohort(tmp_path / "cohort", n=3, size=SMALL)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_default_cohort_group_means_and_separability(tmp_path):
    folder = ph.generate_cohort(tmp_path / "cohort", n=360, seed=0)
    img = nib.load(folder / "sub-0001" / "anat" / "sub-0001_T1w.nii.gz")
    assert img.shape == (64, 64, 64) and img.get_data_dtype() == np.float32
    assert np.allclose(np.diag(img.affine)[:3], 3.0) and nib.aff2axcodes(img.affine) == ("R", "A", "S")
    test_group_means(folder)
    test_separable_but_overlapping(folder)


def test_cli_config_section_and_override(tmp_path):
    from typer.testing import CliRunner

    from medgen.cli.main import app

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"phantom:\n  n: 4\n  seed: 3\n  size: {SMALL}\n")
    out = tmp_path / "cohort"
    result = CliRunner().invoke(app, ["phantom", "--config", str(cfg), "--out", str(out), "--n", "3"])
    assert result.exit_code == 0, result.output
    assert ph.read_parameters(out) == {"n": 3, "seed": 3, "effect_scale": 1.0, "size": SMALL}


def test_cli_subprocess(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "cohort"
    cmd = [sys.executable, "-m", "medgen", "phantom", "--out", str(out), "--n", "3", "--size", str(SMALL)]
    ok = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MEDGEN_QUIET": "1"})
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["subjects"] == 3
