"""`medgen export`: a MONAI bundle of a trained generator that monai.bundle runs in a Python where medgen
cannot be imported, writing the volumes `medgen synth` writes (same voxels, affine, NIfTI codes, scale)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medgen.checkpoint import model_from_checkpoint, save_checkpoint
from medgen.cli.main import app
from medgen.config import TrainConfig
from medgen.data import load_dataset
from medgen.data.phantom import generate_cohort
from medgen.models.registry import create_model, get_model_class
from medgen.pipelines.export import export_bundle
from medgen.pipelines.synthesize import write_synthetic
from medgen.training.loop import fit

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16
MODELS = ["vae", "gan", "alpha-gan"]

# Run as `python -I` (no working folder, PYTHONPATH or user site on sys.path) with every import of medgen
# refused, since the editable install of the test environment would otherwise find it.
NO_MEDGEN = """\
import sys
class _NoMedgen:
    def find_spec(self, name, path=None, target=None):
        if name == "medgen" or name.startswith("medgen."):
            raise ImportError("medgen is not importable here")
sys.meta_path.insert(0, _NoMedgen())
try:
    import medgen
except ImportError:
    pass
else:
    raise SystemExit("medgen imported")
"""

RUN_BUNDLES = NO_MEDGEN + """\
import json
import monai.bundle
for job in json.loads(sys.argv[1]):
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[name]  # each bundle's own scripts/ package
    b = job["bundle"]
    monai.bundle.run(config_file=f"{b}/configs/inference.json", meta_file=f"{b}/configs/metadata.json",
                     logging_file=f"{b}/configs/logging.conf", bundle_root=b, class_name=job["class_name"],
                     num_samples=job["n"], seed=job["seed"], output_dir=job["out"], scale=job.get("scale", "data"))
try:  # an unknown class is refused by name
    monai.bundle.run(config_file=f"{b}/configs/inference.json", meta_file=f"{b}/configs/metadata.json",
                     logging_file=f"{b}/configs/logging.conf", bundle_root=b, class_name="XX", output_dir=b + "-xx")
except Exception as e:
    chain = [e]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    assert any("unknown class_name 'XX'; this generator has classes: CN, MCI, AD" in str(x) for x in chain), chain
else:
    raise SystemExit("class XX was accepted")
assert not [m for m in sys.modules if m.startswith("medgen")], "medgen was imported"
print("ran", len(json.loads(sys.argv[1])), "bundles without medgen")
"""


def run_without_medgen(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-I", "-c", code, *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 6-subject 16^3 phantom and vae, gan and alpha-gan runs of 2 iterations each on it."""
    base = tmp_path_factory.mktemp("export")
    data = load_dataset(generate_cohort(base / "phantom", n=6, seed=0, size=SIZE, workers=1), size=SIZE)
    out = {}
    for name in MODELS:
        fit(name, data, base / name, model_kwargs={"base_width": 4, "latent_dim": 8},
            train=TrainConfig(iterations=2, batch_size=3, precision="fp32", sample_every=0, ema_decay=0.5),
            device="cpu", seed=0)
        out[name] = base / name
    return base, out


def test_bundles_run_without_medgen_and_match_synth(runs):
    base, run_dirs = runs
    jobs = []
    for i, name in enumerate(MODELS):
        bundle = export_bundle(run_dirs[name], base / f"bundle-{name}")
        assert {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()} >= {
            "configs/metadata.json", "configs/inference.json", "configs/logging.conf", "models/model.ts",
            "models/model.pt", "scripts/volumes.py", "docs/README.md"}
        meta = json.loads((bundle / "configs" / "metadata.json").read_text())
        assert meta["network_data_format"]["outputs"]["pred"]["spatial_shape"] == [SIZE] * 3
        assert meta["medgen"]["model"] == name and meta["medgen"]["weights"] == "ema"
        # the weights are a plain state dict, equal to the generator's EMA weights
        weights = torch.load(bundle / "models" / "model.pt", weights_only=True)
        model, _ = model_from_checkpoint(run_dirs[name])
        network = model.decoder if name == "vae" else model.generator
        for key, value in network.state_dict().items():
            assert torch.equal(weights[f"network.{key}"], value)
        jobs.append({"bundle": str(bundle), "class_name": ["CN", "MCI", "AD"][i], "n": 3, "seed": 5 + i,
                     "out": str(base / f"vols-{name}")})
    r = run_without_medgen(RUN_BUNDLES, json.dumps(jobs), cwd=base)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ran 3 bundles without medgen" in r.stdout

    for name, job in zip(MODELS, jobs, strict=True):
        synth = write_synthetic(run_dirs[name], base / f"synth-{name}", n=3, classes=[job["class_name"]],
                                seed=job["seed"])
        ref = sorted(synth.glob("sub-*/anat/*_T1w.nii.gz"))
        got = sorted(Path(job["out"]).glob("*.nii.gz"))
        assert [p.name for p in got] == [f"synthetic_{job['class_name']}_{job['seed']}_{k:04d}.nii.gz" for k in range(3)]
        for a, b in zip(ref, got, strict=True):
            ia, ib = nib.load(a), nib.load(b)
            assert ib.shape == (SIZE,) * 3
            np.testing.assert_allclose(ib.get_fdata(), ia.get_fdata(), atol=1e-6)  # same voxels, same scale
            np.testing.assert_allclose(ib.affine, ia.affine)
            for key in ("sform_code", "qform_code", "xyzt_units"):
                assert int(ib.header[key]) == int(ia.header[key]), key
            assert int(ib.header["sform_code"]) == 4  # the phantom's MNI space, as its volumes carry
            assert ib.get_fdata().min() >= 0.0  # the training data's scale, not [-1, 1]
        listing = json.loads((Path(job["out"]) / f"synthetic_{job['class_name']}_{job['seed']}_datalist.json").read_text())
        assert [it["image"] for it in listing["training"]] == [p.name for p in got]
        assert {it["label"] for it in listing["training"]} == {["CN", "MCI", "AD"].index(job["class_name"])}


def test_bundle_cli_scale_and_no_replacing(runs):
    """The documented `python -m monai.bundle run` command; --scale model; existing volumes are never replaced."""
    base, run_dirs = runs
    r = CliRunner().invoke(app, ["export", str(run_dirs["vae"]), "--out", str(base / "cli-bundle")])
    assert r.exit_code == 0, r.output
    bundle = Path(json.loads(r.stdout)["out"])
    cli = NO_MEDGEN + "import runpy\nsys.argv = ['monai.bundle', *sys.argv[1:]]\nrunpy.run_module('monai.bundle', run_name='__main__')\n"
    args = ["run", "--config_file", f"{bundle}/configs/inference.json", "--meta_file",
            f"{bundle}/configs/metadata.json", "--bundle_root", str(bundle), "--class_name", "MCI",
            "--num_samples", "2", "--seed", "3", "--output_dir", str(base / "cli-vols"), "--scale", "model"]
    r = run_without_medgen(cli, *args, cwd=base)
    assert r.returncode == 0, r.stderr[-3000:]
    vols = sorted((base / "cli-vols").glob("synthetic_MCI_3_*.nii.gz"))
    assert len(vols) == 2
    x = nib.load(vols[0]).get_fdata()
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.min() < 0.0  # the model's scale
    before = vols[0].read_bytes()
    r = run_without_medgen(cli, *args, cwd=base)  # same seed and class again
    assert r.returncode != 0 and "exists" in r.stderr
    assert vols[0].read_bytes() == before


def test_export_refuses_other_models_and_foreign_folders(runs, tmp_path):
    base, run_dirs = runs
    kwargs = get_model_class("parallel-vae").tiny_kwargs(3)
    pvae = create_model("parallel-vae", **kwargs)
    ckpt = save_checkpoint(tmp_path / "pvae.pt", model_name="parallel-vae", kwargs=kwargs, step=0,
                           state={"model": pvae.state_dict()}, affine=np.eye(4))
    r = CliRunner().invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "b")])
    assert r.exit_code == 1
    assert r.output.strip().count("\n") == 0 and "vae, gan, alpha-gan" in r.output
    assert not (tmp_path / "b").exists()
    # a folder medgen did not write is never replaced, even with --overwrite
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    for extra in ([], ["--overwrite"]):
        r = CliRunner().invoke(app, ["export", str(run_dirs["gan"]), "--out", str(mine), *extra])
        assert r.exit_code == 1 and r.output.strip().count("\n") == 0
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep"
    # a bundle medgen wrote is replaced with --overwrite
    first = export_bundle(run_dirs["gan"], tmp_path / "again")
    assert CliRunner().invoke(app, ["export", str(run_dirs["gan"]), "--out", str(first)]).exit_code == 1
    r = CliRunner().invoke(app, ["export", str(run_dirs["alpha-gan"]), "--out", str(first), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert json.loads((first / "configs" / "metadata.json").read_text())["medgen"]["model"] == "alpha-gan"
