import json

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medgen.cli.main import app
from medgen.config import TrainConfig
from medgen.data.dataset import ImageSet
from medgen.data.scenes import load_scene_dataset
from medgen.pipelines.segment import segment
from medgen.training.loop import fit

TINY = dict(num_decoders=3, latent_per_decoder=4, base_width=4)
TRAIN = TrainConfig(iterations=2, batch_size=2, ema_decay=0.0, precision="fp32", log_every=1, sample_every=0,
                    checkpoint_every=0)


def test_scenes_and_segment_cli(tmp_path):
    runner = CliRunner()
    scenes = tmp_path / "scenes"
    r = runner.invoke(app, ["scenes", "--out", str(scenes), "--n", "3", "--frames", "2", "--size", "32",
                            "--seed", "1"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["images"] == 6 and summary["scenes_per_s"] > 0
    assert (scenes / "scenes.json").is_file() and (scenes / "scenes.csv").is_file()
    r = runner.invoke(app, ["scenes", "--out", str(scenes), "--n", "1"])
    assert r.exit_code == 1 and "already exists" in r.output
    r = runner.invoke(app, ["scenes", "--out", str(tmp_path / "x"), "--split", "weird"])
    assert r.exit_code == 2 and "weird" in r.output and not (tmp_path / "x").exists()  # a usage error

    run = fit("parallel-vae", load_scene_dataset(scenes), tmp_path / "run", model_kwargs=TINY, train=TRAIN,
              device="cpu", seed=0)
    out = tmp_path / "seg"
    r = runner.invoke(app, ["segment", "--checkpoint", str(run.checkpoint), "--data", str(scenes), "--out", str(out),
                            "--panels", "2"])
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.stdout)
    assert metrics["images"] == 6 and metrics["num_decoders"] == 3
    assert 0 <= metrics["scenes"]["msc"] <= 1 and -1 <= metrics["scenes"]["fg_ari"] <= 1
    assert len(metrics["scenes"]["mask_area"]) == 3
    roles = metrics["scenes"]["object_pixels"]  # own / background / other object / spare, shares of object pixels
    assert list(roles) == ["own", "background", "other_object", "spare"] and sum(roles.values()) == pytest.approx(1, abs=1e-3)
    assert "share of object pixels" in (out / "index.html").read_text()
    assert "probe" in metrics and "baseline" in metrics["probe"]
    obj = metrics["object_probe"]  # each object's shape from its matched decoder
    assert obj["labels"] == ["sphere", "box", "cylinder"] and 0 <= obj["matched"] <= 1
    assert ("balanced_accuracy" in obj) != ("error" in obj)
    # the model's scores beside the colour baselines', on the same images
    comp = metrics["comparison"]
    assert set(comp) == {"model", "kmeans", "gmm"}
    assert comp["model"]["fg_ari"] == round(metrics["scenes"]["fg_ari"], 4)
    assert comp["gmm"]["msc"] == round(metrics["baselines"]["gmm"]["scenes"]["msc"], 4)
    assert len(list((out / "panels").glob("*.png"))) == 2
    assert len(list((out / "segmentations").glob("*_labels.png"))) == 6
    assert (out / "traversal.png").is_file() and (out / "metrics.json").is_file()
    assert len((out / "per_image.csv").read_text().strip().splitlines()) == 7
    r = runner.invoke(app, ["segment", "--checkpoint", str(tmp_path / "nope.pt"), "--data", str(scenes),
                            "--out", str(tmp_path / "seg2")])
    assert r.exit_code == 1 and r.output.startswith("error:") and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "seg2").exists()
    # a 2D scenes checkpoint against 3D volumes: one line that says so (not an "unknown label")
    vols = tmp_path / "vols"
    r = runner.invoke(app, ["phantom", "--out", str(vols), "--n", "3", "--size", "32"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["segment", "--checkpoint", str(run.checkpoint), "--data", str(vols),
                            "--out", str(tmp_path / "seg3")])
    assert r.exit_code == 1 and "holds 3D volumes" in r.output and "2D parallel-vae" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "seg3").exists()


def test_segment_volumes_writes_nifti_and_tissue_dice(tmp_path):
    g = torch.Generator().manual_seed(0)
    tissue = torch.randint(0, 4, (3, 1, 16, 16, 16), generator=g)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    data = ImageSet(images=tissue.float() / 1.5 - 1, labels=torch.zeros(3, dtype=torch.int64),
                    subjects=["a", "b", "c"], class_names=["CN"], affine=affine, extras={"tissue": tissue})
    run = fit("parallel-vae", data, tmp_path / "run", model_kwargs=dict(TINY, num_decoders=4), train=TRAIN,
              device="cpu", seed=0)
    metrics = segment(run.checkpoint, data, tmp_path / "seg", panels=1)
    assert set(metrics["tissue"]["dice"]) == {"CSF", "GM", "WM"}
    assert 0 <= metrics["tissue"]["mean_dice"] <= 1
    files = sorted((tmp_path / "seg" / "segmentations").glob("*_seg.nii.gz"))
    assert len(files) == 3
    img = nib.load(files[0])
    assert img.shape == (16, 16, 16) and np.allclose(img.affine, affine)
    assert set(np.unique(np.asarray(img.dataobj))) <= {0, 1, 2, 3}
