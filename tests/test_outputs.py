import os
import stat

import pytest

from medgen.errors import MedgenError
from medgen.outputs import atomic_write_json, atomic_write_text, current_umask, staged_dir


def test_staged_dir_gets_the_usual_mode(tmp_path):
    umask = os.umask(0o022)
    try:
        with staged_dir(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]


def test_staged_dir_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError), staged_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(MedgenError, match="--overwrite"), staged_dir(tmp_path / "out"):
        pass


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mode):
    """Files through the atomic writer get 0666 less the umask, like NIfTI files written by nibabel
    (mkstemp alone gives 0600: other users could not read a datalist or checkpoint)."""
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_write_json(tmp_path / "b.json", {"a": 1})
        atomic_write_text(tmp_path / "a.txt", "replaced")  # a rewrite too
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    for name in ("a.txt", "b.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == mode


def test_run_folder_files_are_readable_by_others(tmp_path):
    """A training run (config.yaml, log.csv, checkpoints) under umask 022: every file 0644."""
    import torch

    from medgen.config import TrainConfig
    from medgen.data.dataset import ImageSet
    from medgen.training.loop import fit

    data = ImageSet(images=torch.rand(4, 1, 16, 16, 16) * 2 - 1, labels=torch.tensor([0, 1, 0, 1]),
                    subjects=list("abcd"), class_names=["A", "B"])
    old = os.umask(0o022)
    try:
        fit("vae", data, tmp_path / "run", model_kwargs={"base_width": 2, "latent_dim": 4},
            train=TrainConfig(iterations=2, batch_size=2, precision="fp32", sample_every=0, checkpoint_every=1),
            device="cpu", seed=0)
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"config.yaml", "log.csv", "final.pt", "last.pt"}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: "0o644" for p in files}
