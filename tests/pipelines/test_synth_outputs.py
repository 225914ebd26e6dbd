"""Outputs other tools accept as they are (issue 14): the phantom and synth folders as valid BIDS (the
official validator, pybids), synthetic NIfTI headers and intensities like the training data's, the README
recipe that mixes real and synthetic volumes in one MONAI CacheDataset, and SyntheticDataset items as
MetaTensors with fresh, reproducible volumes per epoch."""

from __future__ import annotations

import collections
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medgen.config import TrainConfig
from medgen.data import load_dataset
from medgen.data.phantom import generate_cohort
from medgen.data.preprocessing import common_header
from medgen.pipelines.synthesize import SyntheticDataset, intensity_map, item_seed, write_synthetic
from medgen.training.loop import fit

ROOT = Path(__file__).resolve().parents[2]
SIZE = 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 6-subject 16^3 phantom, a VAE trained on it for 2 iterations, and 3 volumes synthesised from it."""
    base = tmp_path_factory.mktemp("eco")
    phantom = generate_cohort(base / "phantom", n=6, seed=0, size=SIZE, workers=1)
    data = load_dataset(phantom, size=SIZE)
    run = base / "run"
    fit("vae", data, run, model_kwargs={"base_width": 4, "latent_dim": 8},
        train=TrainConfig(iterations=2, batch_size=3, precision="fp32", sample_every=0), device="cpu", seed=0)
    synth = write_synthetic(run, base / "synth", n=3, seed=0)
    return {"phantom": phantom, "data": data, "run": run, "synth": synth, "base": base}


# ------------------------------------------------------------------------------------------- BIDS


def _validator() -> str | None:
    found = shutil.which("bids-validator-deno")
    beside = Path(sys.executable).parent / "bids-validator-deno"
    return found or (str(beside) if beside.is_file() else None)


def validate(folder: Path) -> dict[str, collections.Counter]:
    """Run the official BIDS validator (bids-validator-deno, the dev extra) on `folder` and its
    derivatives: {dataset: Counter of (severity, code)}."""
    exe = _validator()
    if exe is None:
        pytest.skip("bids-validator-deno is not installed (pip install -e '.[dev]')")
    r = subprocess.run([exe, "--recursive", "--format", "json", str(folder)], capture_output=True, text=True,
                       timeout=300)
    report = json.loads(r.stdout)

    def count(rep: dict) -> collections.Counter:
        return collections.Counter((i["severity"], i["code"]) for i in rep["issues"]["issues"])

    out = {"/": count(report)}
    out.update({name: count(rep) for name, rep in report.get("derivativesSummary", {}).items()})
    return out


def errors(counts: dict[str, collections.Counter]) -> dict[str, list[str]]:
    return {name: sorted(code for (sev, code) in c if sev == "error") for name, c in counts.items()
            if any(sev == "error" for sev, _ in c)}


def test_phantom_folder_is_bids(trained):
    folder = trained["phantom"]
    header = (folder / "participants.tsv").read_text().splitlines()[0].split("\t")
    assert header[0] == "participant_id"
    desc = json.loads((folder / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "raw" and desc["BIDSVersion"]
    assert (folder / ".bidsignore").read_text().split() == ["datalist.json", "phantom.json"]
    assert not list(folder.glob("sub-*/anat/*_dseg.nii.gz"))  # tissue maps are a derivative
    tissue = folder / "derivatives" / "tissue"
    assert json.loads((tissue / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    assert len(list(tissue.glob("sub-*/anat/sub-*_dseg.nii.gz"))) == 6
    counts = validate(folder)
    assert "/derivatives/tissue/" in counts  # the derivative was validated too
    assert errors(counts) == {}


def test_synth_folder_is_a_bids_derivative(trained):
    folder = trained["synth"]
    desc = json.loads((folder / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["SourceDatasets"] == [{"URL": trained["phantom"].resolve().as_uri()}]
    assert "datalist.json" in (folder / ".bidsignore").read_text().split()
    for side in folder.glob("sub-*/anat/*_T1w.json"):
        assert json.loads(side.read_text())["SkullStripped"] is True  # trained on the brain-extracted phantom
        assert side.with_name(side.name.replace(".json", ".nii.gz")).is_file()
    assert errors(validate(folder)) == {}


def test_pybids_loads_both_folders(trained):
    bids = pytest.importorskip("bids")
    raw = bids.BIDSLayout(str(trained["phantom"]), derivatives=True)
    assert raw.get_subjects() == [f"{i:04d}" for i in range(1, 7)]
    assert len(raw.get(suffix="T1w", extension=".nii.gz")) == 6
    assert len(raw.get(suffix="dseg", extension=".nii.gz", scope="derivatives")) == 6
    table = raw.get(suffix="participants", extension=".tsv")[0].get_df()
    assert list(table.columns[:2]) == ["participant_id", "label"]
    synth = bids.BIDSLayout(str(trained["synth"]), is_derivative=True)
    files = synth.get(suffix="T1w", extension=".nii.gz")
    assert len(files) == 3 and all(f.entities["desc"] == "vae" for f in files)
    assert files[0].get_metadata()["SkullStripped"] is True


def test_cohort_readers_still_work(trained):
    """The loaders read the BIDS cohort: tissue maps from the derivative, subjects, labels."""
    data = trained["data"]
    assert data.subjects == [f"sub-{i:04d}" for i in range(1, 7)]
    assert data.extras["tissue"].shape == (6, 1, SIZE, SIZE, SIZE)
    assert set(torch.unique(data.extras["tissue"]).tolist()) == {0, 1, 2, 3}


# ---------------------------------------------------------------------------- headers and intensity


def test_synthetic_headers_match_the_training_data(trained):
    real = nib.load(trained["phantom"] / "sub-0001" / "anat" / "sub-0001_T1w.nii.gz")
    for path in sorted(trained["synth"].glob("sub-*/anat/*_T1w.nii.gz")):
        img = nib.load(path)
        assert int(img.header["sform_code"]) == int(real.header["sform_code"]) == 4  # MNI-aligned
        assert int(img.header["qform_code"]) == int(real.header["qform_code"]) == 4
        assert img.header.get_xyzt_units() == real.header.get_xyzt_units() == ("mm", "unknown")
        np.testing.assert_allclose(img.affine, real.affine, atol=1e-5)


def test_common_header_codes():
    a = {"sform_code": 1, "qform_code": 1, "xyzt_units": 10}
    assert common_header([a, a, {"sform_code": 4, "qform_code": 4, "xyzt_units": 2}], own_affine=True) == a
    assert common_header([a], own_affine=False)["sform_code"] == 2  # re-centred grid: aligned, not scanner
    assert common_header([{"sform_code": 0, "qform_code": 0, "xyzt_units": 0}], True)["sform_code"] == 1
    assert common_header([{}], True) == {}


def test_synthetic_intensities_in_the_training_scale(trained, tmp_path):
    low, high = trained["data"].normalisation["source_range"]
    real = np.stack([nib.load(p).get_fdata() for p in sorted(trained["phantom"].glob("sub-*/anat/*_T1w.nii.gz"))])
    assert low == pytest.approx(float(np.median(np.percentile(real.reshape(6, -1), 0.5, axis=1))), abs=1e-6)
    assert 0.0 <= low < high <= float(real.max())
    model = write_synthetic(trained["run"], tmp_path / "model", n=3, seed=0, scale="model")
    for a, b in zip(sorted(trained["synth"].glob("sub-*/anat/*.nii.gz")),
                    sorted(model.glob("sub-*/anat/*.nii.gz")), strict=True):
        x_data, x_model = nib.load(a).get_fdata(), nib.load(b).get_fdata()
        assert x_model.min() >= -1 and x_model.max() <= 1
        assert low - 1e-6 <= x_data.min() and x_data.max() <= high + 1e-6  # the real data's range
        np.testing.assert_allclose(x_data, low + (x_model + 1) / 2 * (high - low), atol=1e-5)
    assert f"{high:.6g}" in json.loads((trained["synth"] / "dataset_description.json").read_text())["Intensity"]
    assert json.loads(next(model.glob("sub-*/anat/*.json")).read_text())["intensity_scale"] == "model"


def test_intensity_map_falls_back_to_the_model_scale_for_old_checkpoints():
    assert intensity_map({}, "data") is None
    assert intensity_map({"source_range": [0.0, 0.8]}, "data") == (0.0, 0.8)
    assert intensity_map({"source_range": [0.0, 0.8]}, "model") is None


def _readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- tested by tests/pipelines/test_synth_outputs.py -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README lost the tested mixing snippet"
    return m.group(1)


def test_readme_mixing_snippet_runs(trained):
    """The README's recipe: real (phantom) and synthetic volumes in one MONAI CacheDataset, same scale."""
    code = _readme_snippet()
    code = code.replace('"data/phantom"', repr(str(trained["phantom"]))).replace('"runs/ag-synth"',
                                                                             repr(str(trained["synth"])))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    dataset, loader = scope["dataset"], scope["loader"]
    assert len(dataset) == 6 + 3
    images = [dataset[i]["image"] for i in range(len(dataset))]
    assert all(tuple(x.shape) == (1, SIZE, SIZE, SIZE) for x in images)
    real_max = max(float(x.max()) for x in images[:6])
    synth = images[6:]
    assert all(0.0 <= float(x.min()) and float(x.max()) <= real_max for x in synth)  # one intensity scale
    np.testing.assert_allclose(np.asarray(synth[0].affine), np.asarray(images[0].affine), atol=1e-5)
    batches = list(loader)
    assert sum(b["image"].shape[0] for b in batches) == 9
    assert sorted(int(v) for b in batches for v in b["label"]) == sorted(
        [int(dataset[i]["label"]) for i in range(9)])


# -------------------------------------------------------------------------------- SyntheticDataset


def test_synthetic_dataset_items_are_metatensors_with_the_training_affine(trained):
    from monai.data import MetaTensor
    from monai.transforms import Orientation

    ds = SyntheticDataset(trained["run"], n=4, seed=3)
    item = ds[0]
    assert isinstance(item["image"], MetaTensor) and item["image"].shape == (1, SIZE, SIZE, SIZE)
    np.testing.assert_allclose(np.asarray(item["image"].affine), trained["data"].affine, atol=1e-6)
    assert not np.allclose(np.asarray(item["image"].affine), np.eye(4))
    low, high = trained["data"].normalisation["source_range"]
    assert low - 1e-6 <= float(item["image"].min()) and float(item["image"].max()) <= high + 1e-6
    lps = Orientation("LPS")(item["image"])  # MONAI reads the affine the item carries
    assert nib.aff2axcodes(np.asarray(lps.affine)) == ("L", "P", "S")
    corner = trained["data"].affine @ np.array([SIZE - 1, SIZE - 1, 0, 1.0])  # where the flipped grid starts
    np.testing.assert_allclose(np.asarray(lps.affine)[:, 3], corner, atol=1e-6)
    model = SyntheticDataset(trained["run"], n=4, seed=3, scale="model")
    assert float(model[0]["image"].min()) >= -1 and torch.allclose(
        low + (model[0]["image"].as_tensor() + 1) / 2 * (high - low), item["image"].as_tensor(), atol=1e-5)


def test_synthetic_dataset_fresh_per_epoch_and_reproducible(trained):
    ds = SyntheticDataset(trained["run"], n=4, seed=3)
    first = torch.stack([ds[i]["image"].as_tensor() for i in range(4)])
    ds.set_epoch(1)
    second = torch.stack([ds[i]["image"].as_tensor() for i in range(4)])
    assert not torch.allclose(first, second)  # fresh volumes in a new epoch
    ds.set_epoch(0)
    assert torch.equal(torch.stack([ds[i]["image"].as_tensor() for i in range(4)]), first)  # same seed, same epoch
    other = SyntheticDataset(trained["run"], n=4, seed=4)
    assert not torch.allclose(other[0]["image"].as_tensor(), first[0])
    assert len({item_seed(3, e, i) for e in range(3) for i in range(4)}) == 12


def test_synthetic_dataset_with_workers(trained):
    """Two (persistent) workers: every item distinct, the same as in the main process, set_epoch reaches them."""
    from monai.data import DataLoader

    ds = SyntheticDataset(trained["run"], n=6, seed=3)
    serial = [torch.stack([ds[i]["image"].as_tensor() for i in range(6)])]
    ds.set_epoch(1)
    serial.append(torch.stack([ds[i]["image"].as_tensor() for i in range(6)]))
    ds.set_epoch(0)
    loader = DataLoader(ds, batch_size=2, num_workers=2, persistent_workers=True)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        got = torch.cat([b["image"].as_tensor() for b in loader])
        assert torch.allclose(got, serial[epoch], atol=1e-6)
        flat = got.reshape(6, -1)
        assert all(not torch.allclose(flat[i], flat[j]) for i in range(6) for j in range(i))
    assert not torch.allclose(serial[0], serial[1])
