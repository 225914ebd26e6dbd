"""Tracking of the one training loop: plain progress lines when stderr is not a terminal, and TensorBoard
event files (losses, sample montages, validation metrics) read back with tensorboard's EventAccumulator."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medgen.cli.main import app
from medgen.config import TrainConfig
from medgen.data.dataset import ImageSet
from medgen.errors import MedgenError
from medgen.training.loop import fit

pytestmark = pytest.mark.usefixtures("one_thread")

LINE = re.compile(r"^train vae: iteration (\d+)/(\d+) \((\d+)%\) \| loss \S+ recon \S+ kl \S+ \| "
                  r"(\S+) it/s, elapsed \d+:\d\d:\d\d, ETA \d+:\d\d:\d\d$")


def data16(n: int = 6) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 3
    affine = np.diag([12.0, 12.0, 12.0, 1.0])
    return ImageSet(images=torch.rand(n, 1, 16, 16, 16, generator=g) * 2 - 1, labels=labels,
                    subjects=[f"s{i}" for i in range(n)], class_names=["CN", "MCI", "AD"], affine=affine)


def train(**kw) -> TrainConfig:
    base = dict(iterations=6, batch_size=3, precision="fp32", sample_every=0, checkpoint_every=0, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


KWARGS = {"base_width": 4, "latent_dim": 8}


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MEDGEN_QUIET", raising=False)
    fit("vae", data16(), tmp_path / "run", model_kwargs=KWARGS, train=train(iterations=7, progress_every=3),
        device="cpu")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("train vae")]
    assert [int(LINE.match(line).group(1)) for line in lines] == [3, 6, 7], err  # every 3 and the last
    assert all(float(LINE.match(line).group(4)) > 0 for line in lines)
    assert lines[-1].endswith("ETA 0:00:00") and "(100%)" in lines[-1]
    # quiet: nothing
    monkeypatch.setenv("MEDGEN_QUIET", "1")
    fit("vae", data16(), tmp_path / "quiet", model_kwargs=KWARGS, train=train(progress_every=1), device="cpu")
    assert "train vae" not in capsys.readouterr().err


def test_train_in_a_batch_job_prints_uncut_lines(tmp_path):
    """`medgen train` with stderr to a pipe (a batch job): plain lines longer than 80 columns, not one at the end."""
    g = np.random.default_rng(0)
    items = []
    for i in range(6):
        nib.save(nib.Nifti1Image(g.random((16, 16, 16)).astype(np.float32), np.diag([6.0, 6, 6, 1])),
                 str(tmp_path / f"s{i}.nii.gz"))
        items.append({"image": f"s{i}.nii.gz", "label": ["CN", "MCI", "AD"][i % 3]})
    (tmp_path / "datalist.json").write_text(json.dumps({"training": items}))
    (tmp_path / "c.yaml").write_text("data: {size: 16}\nmodels:\n  alpha-gan: {base_width: 4, latent_dim: 8}\n"
                                     "train: {sample_every: 0, checkpoint_every: 0}\n")
    env = {k: v for k, v in os.environ.items() if k != "MEDGEN_QUIET"}
    env.update(OMP_NUM_THREADS="1", COLUMNS="80")
    cmd = [sys.executable, "-m", "medgen", "train", "alpha-gan", "--data", str(tmp_path / "datalist.json"),
           "--out", str(tmp_path / "run"), "--config", str(tmp_path / "c.yaml"), "--iterations", "4",
           "--batch-size", "2", "--device", "cpu", "--precision", "fp32", "--progress-every", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("train alpha-gan: iteration")]
    assert [line.split()[3] for line in lines] == ["2/4", "4/4"], r.stderr
    assert all(len(line) > 80 and "gp_code" in line and re.search(r" it/s, elapsed \S+, ETA \d+:\d\d:\d\d$", line)
               for line in lines)  # whole lines, not cut to the 80 columns of a non-terminal


needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="tensorboard is not installed (pip install -e '.[dev]')")


def events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


@needs_tensorboard
def test_tensorboard_losses_montages_and_validation(tmp_path):
    calls = []

    def validate(model):
        calls.append(1)
        return {"score": float(len(calls))}

    run = tmp_path / "run"
    fit("vae", data16(), run, model_kwargs=KWARGS, device="cpu", validate=validate, validate_every=2,
        train=train(iterations=4, sample_every=2, log_every=1, tensorboard=True))
    acc = events(run / "tensorboard")
    tags = acc.Tags()
    assert {"train/loss", "train/recon", "train/kl", "val/score"} <= set(tags["scalars"])
    loss = acc.Scalars("train/recon")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    header = (run / "log.csv").read_text().splitlines()[0].split(",")
    col = header.index("recon")
    logged = [float(row.split(",")[col]) for row in (run / "log.csv").read_text().splitlines()[1:]]
    np.testing.assert_allclose([e.value for e in loss], logged, rtol=1e-5)  # the values log.csv holds
    assert [(e.step, e.value) for e in acc.Scalars("val/score")] == [(2, 1.0), (4, 2.0)]
    images = acc.Images("samples")
    assert [e.step for e in images] == [2, 4]
    assert images[0].width > 16 and images[0].height > 16  # the montage PNG, not a blank tag
    from PIL import Image

    with Image.open(run / "samples" / "iter_000004.png") as im:
        assert (images[-1].width, images[-1].height) == im.size


@needs_tensorboard
def test_tensorboard_off_by_default_and_on_resume(tmp_path):
    run = tmp_path / "run"
    fit("vae", data16(), run, model_kwargs=KWARGS, device="cpu", train=train(iterations=3, checkpoint_every=1))
    assert not (run / "tensorboard").exists()  # off by default
    fit("vae", data16(), run, model_kwargs=KWARGS, device="cpu", resume=True,
        train=train(iterations=5, checkpoint_every=1, tensorboard=True))
    assert [e.step for e in events(run / "tensorboard").Scalars("train/loss")] == [4, 5]


def test_tensorboard_missing_is_one_clear_error(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(MedgenError, match=r"pip install 'medgen\[tensorboard\]'"):
        fit("vae", data16(), tmp_path / "run", model_kwargs=KWARGS, device="cpu", train=train(tensorboard=True))
    assert not (tmp_path / "run").exists()  # refused before the run folder exists
    r = CliRunner().invoke(app, ["train", "vae", "--out", str(tmp_path / "cli"), "--tensorboard", "--device", "cpu"])
    assert r.exit_code == 1 and "medgen[tensorboard]" in r.output and r.output.strip().count("\n") == 0
    assert not (tmp_path / "cli").exists()


def test_tracking_options_do_not_change_a_cv_run_config():
    """cv-evaluate --resume with --tensorboard or another progress interval continues the same experiment."""
    from medgen.config import Config
    from medgen.pipelines.cv import _config_fingerprint

    plain, tracked = Config(), Config()
    tracked.train.tensorboard, tracked.train.progress_every = True, 7
    assert _config_fingerprint(tracked) == _config_fingerprint(plain)
    tracked.train.lr = 1e-3
    assert _config_fingerprint(tracked) != _config_fingerprint(plain)
