"""Issue 11 items 1-3, 9 and 12 (outputs): nothing the user owns is lost, one writer, clear write errors."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from medgen import outputs
from medgen.cli.common import handle_errors
from medgen.cli.main import app
from medgen.errors import MedgenError
from medgen.outputs import (
    MARKER,
    acquire_lock,
    atomic_write_bytes,
    check_out_path,
    check_output_dir,
    lock_path,
    release_lock,
    staged_dir,
)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------- item 1: dangerous --out

@pytest.mark.parametrize("bad", ["", ".", "..", "/"])
def test_dangerous_out_is_refused(tmp_path, monkeypatch, bad):
    work = tmp_path / "s"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(MedgenError, match="--out"):
        check_out_path(bad)


def test_home_and_path_under_a_file_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    with pytest.raises(MedgenError, match="home folder"):
        check_out_path(tmp_path / "home")
    (tmp_path / "f").write_text("x")
    with pytest.raises(MedgenError, match="is a file"):
        check_out_path(tmp_path / "f" / "out")


def test_phantom_out_dot_overwrite_keeps_the_folder(tmp_path, monkeypatch):
    work = tmp_path / "s"
    work.mkdir()
    (work / "keep.txt").write_text("x")
    monkeypatch.chdir(work)
    for out in (".", ""):
        res = CliRunner().invoke(app, ["phantom", "--n", "3", "--size", "16", "--out", out, "--overwrite"])
        assert res.exit_code == 1
        assert "current folder" in res.output and "Traceback" not in res.output
    assert (work / "keep.txt").read_text() == "x"
    assert sorted(p.name for p in work.iterdir()) == ["keep.txt"]


# ---------------------------------------------------------------- item 2: --out is or holds an input

def test_out_holding_or_inside_an_input_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"x")
    (run / MARKER).write_text("{}")
    with pytest.raises(MedgenError, match="is the input"):
        check_output_dir(run, overwrite=True, inputs=[run])
    with pytest.raises(MedgenError, match="holds the input"):
        check_output_dir(run, overwrite=True, inputs=[run / "last.pt"])
    with pytest.raises(MedgenError, match="inside the input folder"):
        check_output_dir(run / "synth", overwrite=True, inputs=[run])
    assert (run / "last.pt").is_file()


def test_train_out_equal_to_data_is_refused(tmp_path):
    data = tmp_path / "D"
    data.mkdir()
    (data / "datalist.json").write_text("{}")
    res = CliRunner().invoke(app, ["train", "vae", "--data", str(data), "--out", str(data), "--overwrite"])
    assert res.exit_code == 1 and "input" in res.output
    assert (data / "datalist.json").is_file()


def test_overwrite_replaces_only_a_folder_medgen_wrote(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    with pytest.raises(MedgenError, match="not written by medgen"), staged_dir(foreign, overwrite=True):
        pass
    assert (foreign / "thesis.tex").is_file()
    ours = tmp_path / "ours"
    with staged_dir(ours) as tmp:
        (tmp / "a").write_text("1")
    assert (ours / MARKER).is_file()
    with staged_dir(ours, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in ours.iterdir()) == [MARKER, "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "ours"]  # no lock or aside folders left


# ---------------------------------------------------------------- item 3: a folder appearing meanwhile; one writer

def test_folder_appearing_during_the_run_is_kept(tmp_path):
    out = tmp_path / "race"
    with pytest.raises(MedgenError, match="appeared while this run was writing"), staged_dir(out) as tmp:
        (tmp / "result").write_text("new")
        out.mkdir()
        (out / "precious.txt").write_text("mine")
    assert (out / "precious.txt").read_text() == "mine"
    kept = tmp_path / f"race.medgen-{os.getpid()}"
    assert (kept / "result").read_text() == "new"


def test_a_second_writer_gets_a_clear_line(tmp_path):
    import fcntl

    out = tmp_path / "conc"
    fd = os.open(lock_path(out), os.O_RDWR | os.O_CREAT)  # another "process": a separate open file
    os.write(fd, b"4242\n")
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(MedgenError, match="pid 4242"), staged_dir(out):
            pass
    finally:
        os.close(fd)
    assert not out.exists()
    acquire_lock(out)  # the lock is re-entrant within one process and released cleanly
    acquire_lock(out)
    release_lock(out)
    release_lock(out)
    assert not lock_path(out).exists()


# ---------------------------------------------------------------- item 9: leftovers of killed runs, SIGTERM

def test_stale_partial_folders_of_dead_processes_are_removed(tmp_path):
    out = tmp_path / "o"
    stale = tmp_path / f".o.partial-{_dead_pid()}-abc"
    stale.mkdir()
    (stale / "x").write_text("half")
    alive = tmp_path / f".o.partial-{os.getppid()}-def"  # a live process: left alone
    alive.mkdir()
    with staged_dir(out) as tmp:
        (tmp / "y").write_text("1")
    assert not stale.exists() and alive.exists()


def test_killed_overwrite_gets_its_old_folder_back(tmp_path):
    out = tmp_path / "o"
    old = tmp_path / f".o.old-{_dead_pid()}-abc"
    old.mkdir()
    (old / MARKER).write_text("{}")
    outputs.remove_stale_leftovers(out)
    assert (out / MARKER).is_file() and not old.exists()


def test_sigterm_is_handled_like_ctrl_c(tmp_path):
    out = tmp_path / "o"

    @handle_errors
    def command() -> None:
        with staged_dir(out) as tmp:
            (tmp / "x").write_text("1")
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(typer.Exit) as info:
        command()
    assert info.value.exit_code == 143
    assert list(tmp_path.iterdir()) == []  # no partial folder, no lock file
    assert signal.getsignal(signal.SIGTERM) is not None


# ---------------------------------------------------------------- item 12: disk full, read-only, checkpoint writes

def test_disk_full_names_the_file(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(MedgenError, match=r"a\.json: no space left on device"):
        atomic_write_bytes(tmp_path / "a.json", b"{}")
    assert list(tmp_path.iterdir()) == []


def test_read_only_output_folder(tmp_path, monkeypatch):
    def ro(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(outputs.tempfile, "mkdtemp", ro)
    with pytest.raises(MedgenError, match="read-only file system"), staged_dir(tmp_path / "o"):
        pass


def test_disk_full_inside_a_staged_folder(tmp_path):
    with pytest.raises(MedgenError, match="no space left"), staged_dir(tmp_path / "o") as tmp:
        (tmp / "x").write_text("1")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_writer_failure_is_one_line(tmp_path):
    def torch_like(f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")

    with pytest.raises(MedgenError, match=r"writing .*last\.pt failed \(disk full"):
        outputs.atomic_write(tmp_path / "last.pt", torch_like)


def test_unexpected_os_errors_become_one_clear_line(capsys):
    @handle_errors
    def loop() -> None:
        raise OSError(errno.ELOOP, "Too many levels of symbolic links", "/data/a.nii.gz")

    @handle_errors
    def deep() -> None:
        json.loads("[" * 200_000 + "]" * 200_000)

    for fn, expected in ((loop, "/data/a.nii.gz: too many levels of symbolic links"), (deep, "nested too deeply")):
        with pytest.raises(typer.Exit) as info:
            fn()
        assert info.value.exit_code == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
