"""Synthesis: deterministic sampling, the BIDS-derivative folder read by plain MONAI, the on-the-fly Dataset."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medgen.checkpoint import model_from_checkpoint
from medgen.config import TrainConfig
from medgen.data.dataset import ImageSet
from medgen.errors import MedgenError
from medgen.models.sampling import sample_images
from medgen.pipelines.synthesize import SyntheticDataset, split_labels, write_synthetic
from medgen.training.loop import fit

AFFINE = np.array([[-3.0, 0, 0, 90], [0, 3.0, 0, -126], [0, 0, 3.0, -72], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(9) % 3
    data = ImageSet(images=torch.rand(9, 1, 16, 16, 16, generator=g) * 2 - 1, labels=labels,
                    subjects=[f"s{i}" for i in range(9)], class_names=["CN", "MCI", "AD"], affine=AFFINE)
    out = tmp_path_factory.mktemp("syn") / "run"
    fit("vae", data, out, model_kwargs={"base_width": 4, "latent_dim": 8},
        train=TrainConfig(iterations=2, batch_size=3, precision="fp32", sample_every=0), device="cpu", seed=0)
    return out


def test_same_seed_same_volumes(run_dir):
    model, _ = model_from_checkpoint(run_dir)
    a = sample_images(model, [0, 1, 2, 2], seed=5, batch_size=3)
    b = sample_images(model, [0, 1, 2, 2], seed=5, batch_size=1)
    c = sample_images(model, [0, 1, 2, 2], seed=6)
    assert a.shape == (4, 1, 16, 16, 16) and torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, c)
    assert a.min() >= -1 and a.max() <= 1


def test_split_labels_even():
    assert split_labels(5, [2, 0]) == [2, 2, 2, 0, 0]
    with pytest.raises(MedgenError):
        split_labels(0, [0])


def test_folder_read_by_plain_monai(run_dir, tmp_path):
    from monai.data import DataLoader, Dataset, load_decathlon_datalist
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    out = write_synthetic(run_dir, tmp_path / "syn", n=4, classes=["AD", "CN"], seed=3)
    files = load_decathlon_datalist(str(out / "datalist.json"), is_segmentation=False,
                                    data_list_key="training", base_dir=str(out))
    loader = DataLoader(Dataset(files, Compose([LoadImaged(keys="image"), EnsureChannelFirstd(keys="image")])),
                        batch_size=2)
    batches = list(loader)
    assert sum(b["image"].shape[0] for b in batches) == 4
    assert batches[0]["image"].shape[1:] == (1, 16, 16, 16)
    assert sorted(int(v) for b in batches for v in b["label"]) == [0, 0, 2, 2]
    assert np.allclose(np.asarray(batches[0]["image"].affine[0]), AFFINE)  # training affine, not identity
    dl = json.loads((out / "datalist.json").read_text())
    assert dl["labels"] == {"0": "CN", "1": "MCI", "2": "AD"} and dl["numTraining"] == 4
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "medgen"
    img = out / dl["training"][0]["image"]
    assert np.allclose(nib.load(img).affine, AFFINE)
    side = json.loads(img.with_name(img.name.replace(".nii.gz", ".json")).read_text())
    assert side["seed"] == 3 and side["class"] == "AD" and side["checkpoint_sha256"] == desc["Checkpoint"]["sha256"]
    assert (out / "participants.tsv").read_text().splitlines()[1].split("\t") == ["sub-synth0001", "AD", "2"]
    # same seed, same volumes; the folder is refused unless overwrite
    with pytest.raises(MedgenError, match="already exists"):
        write_synthetic(run_dir, out, n=4, classes=["AD", "CN"], seed=3)
    again = write_synthetic(run_dir, tmp_path / "syn2", n=4, classes=["AD", "CN"], seed=3)
    assert np.array_equal(nib.load(img).get_fdata(), nib.load(again / dl["training"][0]["image"]).get_fdata())
    model, _ = model_from_checkpoint(run_dir)
    expected = sample_images(model, [2, 2, 0, 0], seed=3)
    written = np.stack([nib.load(again / it["image"]).get_fdata() for it in dl["training"]])
    assert np.allclose(written, expected[:, 0].numpy(), atol=1e-6)  # the files are exactly sample_images


def test_unknown_class_is_refused_and_nothing_written(run_dir, tmp_path):
    with pytest.raises(MedgenError, match="unknown class 'XX'"):
        write_synthetic(run_dir, tmp_path / "syn", n=2, classes=["XX"], seed=0)
    assert not (tmp_path / "syn").exists() and list(tmp_path.iterdir()) == []


def test_synthetic_dataset_on_the_fly(run_dir):
    ds = SyntheticDataset(run_dir, n=6, classes=["MCI"], seed=1)
    assert len(ds) == 6
    item = ds[2]
    assert item["image"].shape == (1, 16, 16, 16) and item["label"] == 1
    assert torch.equal(ds[2]["image"], item["image"]) and not torch.equal(ds[3]["image"], item["image"])
    loader = torch.utils.data.DataLoader(ds, batch_size=3)
    assert next(iter(loader))["image"].shape == (3, 1, 16, 16, 16)
