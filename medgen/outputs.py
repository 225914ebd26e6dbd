"""Safe output: refuse dangerous or foreign folders, lock, stage then rename, atomic file writes.

Nothing half-written is ever left under a user's output path: folders are built under a hidden
temporary sibling and renamed into place at the end; single files go through temp file + os.replace.
Nothing medgen did not write is ever deleted: `--overwrite` replaces only a folder holding medgen's
marker file (MARKER), the final rename never replaces a folder that appeared meanwhile, and one
process at a time writes an output folder (a lock file beside it names the writer's pid).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import medgen
from medgen.console import log
from medgen.errors import MedgenError, describe_os_error

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, the pid file alone
    fcntl = None  # type: ignore[assignment]

MARKER = ".medgen"
"""The file every output folder medgen creates carries; only such folders may be replaced."""


def _real(p: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(p))))


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_out_path(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (),
                   option: str = "--out") -> Path:
    """Refuse an output path that would put the user's own files at risk.

    Refused: an empty path, the working folder or one of its parents, the home folder or one of its
    parents, the filesystem root, a path under a file, and a path that is, holds or lies inside one
    of `inputs` (the command's input files and folders).

    Returns:
        The path as given, as a Path.
    """
    raw = os.fspath(path)
    if raw.strip() == "":
        raise MedgenError(f"{option} is empty (an unset shell variable?); give a new folder for the output")
    out = Path(raw)
    real = _real(out)
    cwd = _real(os.getcwd())
    home = _real(os.path.expanduser("~"))
    if real == Path(real.anchor):
        raise MedgenError(f"{option} {raw} is the filesystem root; give a new folder for the output")
    if _within(cwd, real):
        what = "the current folder" if real == cwd else "a parent of the current folder"
        hint = " (an empty --out, e.g. an unset variable, means the same)" if real == cwd else ""
        raise MedgenError(f"{option} {raw} is {what}{hint}; give a new folder for the output")
    if _within(home, real):
        raise MedgenError(f"{option} {raw} is the home folder or one of its parents; give a new folder for the output")
    for parent in [real, *real.parents]:
        if parent.exists() and not parent.is_dir():
            if parent == real:
                raise MedgenError(f"{option} {raw} exists and is a file, not a folder")
            raise MedgenError(f"{option} {raw}: {parent} is a file, so no folder can be made under it")
    for inp in inputs:
        if inp is None or os.fspath(inp) == "":
            continue
        r = _real(inp)
        if not r.exists():
            continue
        if _within(r, real):
            what = "is" if r == real else "holds"
            raise MedgenError(f"{option} {raw} {what} the input {inp}; write the output to another folder")
        if r.is_dir() and _within(real, r):
            raise MedgenError(f"{option} {raw} lies inside the input folder {inp}; write the output elsewhere")
    return out


def has_marker(folder: str | os.PathLike) -> bool:
    """Whether `folder` was written by medgen (it holds the MARKER file)."""
    return (Path(folder) / MARKER).is_file()


def write_marker(folder: str | os.PathLike, command: str | None = None) -> None:
    """Write medgen's marker file into `folder` (created by medgen; may be replaced with --overwrite)."""
    # no time or pid in it: same inputs, same bytes
    info = {"written_by": "medgen", "version": medgen.__version__, "command": command}
    atomic_write_json(Path(folder) / MARKER, info)


def check_output_dir(
    path: str | os.PathLike, overwrite: bool = False, resume: bool | None = None,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Refuse a dangerous output path, and an existing non-empty folder unless overwrite or resume.

    Args:
        path: the output folder.
        overwrite: replace what is there (only a folder medgen wrote; done when the new output is complete).
        resume: keep what is there and continue into it; None for commands that cannot resume
            (the error message then does not offer --resume).
        inputs: the command's input files and folders (the output may not hold or lie in them).
    Returns:
        The folder as a Path.
    """
    out = check_out_path(path, inputs)
    if out.exists() and not out.is_dir():
        raise MedgenError(f"output path {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not resume:
        if not overwrite:
            hint = " or --resume to continue" if resume is not None else ""
            raise MedgenError(f"output folder {out} already exists; pass --overwrite to replace it{hint}")
        if not has_marker(out):
            raise MedgenError(f"output folder {out} was not written by medgen (it has no {MARKER} file), so "
                              "--overwrite will not replace it; remove it yourself or choose a new --out")
    return out


# ---------------------------------------------------------------- locks and stale leftovers

_LOCKS: dict[Path, list[Any]] = {}  # real lock path -> [fd, depth]


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_path(out: str | os.PathLike) -> Path:
    """The lock file of output folder `out`: a hidden sibling `.NAME.writer.lock`."""
    out = Path(out)
    return out.parent / f".{out.name}.writer.lock"


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def acquire_lock(out: str | os.PathLike) -> Path:
    """Become the one writer of output folder `out` (re-entrant within a process).

    The lock file beside the folder holds this process's pid; a second writer gets a MedgenError naming
    the first one's pid. Released by `release_lock` or when the process ends (a lock of a dead process
    is taken over).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lp = _real(lock_path(out))
    held = _LOCKS.get(lp)
    if held is not None:
        held[1] += 1
        return lp
    for _ in range(10):
        fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pid = _read_pid(lp)
                    raise MedgenError(f"output folder {out} is being written by another medgen process "
                                      f"(pid {pid if pid else '?'}, lock file {lp}); wait for it or choose "
                                      "another --out") from None
            else:
                pid = _read_pid(lp)
                if pid and pid != os.getpid() and _pid_alive(pid):
                    raise MedgenError(f"output folder {out} is being written by another medgen process "
                                      f"(pid {pid}, lock file {lp}); wait for it or choose another --out")
            try:  # the file may have been unlinked by its previous owner between open and flock
                same = os.stat(lp).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        _LOCKS[lp] = [fd, 1]
        return lp
    raise MedgenError(f"could not lock output folder {out} (lock file {lp} keeps changing)")


def release_lock(out: str | os.PathLike) -> None:
    """Release a lock taken with `acquire_lock` (the lock file is removed when the last hold ends)."""
    lp = _real(lock_path(out))
    held = _LOCKS.get(lp)
    if held is None:
        return
    held[1] -= 1
    if held[1] > 0:
        return
    del _LOCKS[lp]
    with contextlib.suppress(OSError):
        os.unlink(lp)
    with contextlib.suppress(OSError):
        os.close(held[0])


@contextlib.contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[None]:
    """`with output_lock(out):` hold the one-writer lock of `out`."""
    acquire_lock(out)
    try:
        yield
    finally:
        release_lock(out)


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)-")


def remove_stale_leftovers(out: str | os.PathLike) -> list[Path]:
    """Remove hidden `.OUT.partial-PID-*` folders of `out` whose process is gone (a killed run).

    A `.OUT.old-PID-*` folder (the previous output, moved aside by an overwrite that was killed) is
    moved back when `out` is missing, and removed otherwise. Returns the paths removed or restored.
    """
    out = Path(out)
    parent = out.parent
    if not parent.is_dir():
        return []
    done = []
    for p in sorted(parent.iterdir()):
        m = _LEFTOVER.match(p.name)
        if not m or m["name"] != out.name or not p.is_dir():
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        if m["kind"] == "old" and not out.exists():
            with contextlib.suppress(OSError):
                os.rename(p, out)
                done.append(p)
                continue
        shutil.rmtree(p, ignore_errors=True)
        done.append(p)
    if done:
        log(f"removed {len(done)} leftover folder(s) of an interrupted run beside {out}")
    return done


def make_output_dir(out: str | os.PathLike, command: str | None = None) -> Path:
    """Create output folder `out` (written in place, e.g. a training run) with medgen's marker."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not has_marker(out):
        write_marker(out, command)
    return out


def clear_output_dir(out: str | os.PathLike) -> None:
    """Delete an output folder for --overwrite: only one medgen wrote (it has the marker)."""
    out = Path(out)
    if not out.exists():
        return
    if any(out.iterdir()) and not has_marker(out):
        raise MedgenError(f"output folder {out} was not written by medgen (it has no {MARKER} file), so "
                          "--overwrite will not replace it; remove it yourself or choose a new --out")
    shutil.rmtree(out)


def _write_failure(where: Path, e: BaseException) -> MedgenError | None:
    """A clear error for a failed write (disk full, read-only, ...), or None if `e` is not one."""
    if isinstance(e, OSError):
        return MedgenError(describe_os_error(e, default_path=where))
    if isinstance(e, RuntimeError) and ("PytorchStreamWriter" in str(e) or "inline_container" in str(e)):
        return MedgenError(f"writing {where} failed (disk full or not writable?); free some space or choose another --out")
    return None


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike, overwrite: bool = False,
               inputs: Iterable[str | os.PathLike | None] = (), command: str | None = None) -> Iterator[Path]:
    """Build a folder under a temporary sibling and move it to `path` only on success.

    The folder gets medgen's marker; while it is built this process holds the folder's lock, and stale
    leftovers of killed runs into the same path are removed first. The final move never deletes a
    folder this run did not check: a folder that appeared at `path` meanwhile is left alone (the new
    output is then kept beside it and the error names both).

    Args:
        path: the final folder.
        overwrite: replace an existing folder medgen wrote at `path` once the new one is complete.
        inputs: the command's inputs (refused as or around the output).
        command: recorded in the marker file.
    Yields:
        The temporary folder to write into.
    """
    inputs = list(inputs)
    out = check_output_dir(path, overwrite=overwrite, inputs=inputs)
    with output_lock(out):
        remove_stale_leftovers(out)
        out = check_output_dir(path, overwrite=overwrite, inputs=inputs)  # again, now that we hold the lock
        replace = out.exists() and any(out.iterdir())
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
        except OSError as e:
            raise MedgenError(describe_os_error(e, default_path=out.parent)) from e
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; the final folder should get the usual mode
        try:
            yield tmp
            write_marker(tmp, command)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            err = _write_failure(out, e)
            if err is not None:
                raise err from e
            raise
        _move_into_place(tmp, out, replace)


def _move_into_place(tmp: Path, out: Path, replace: bool) -> None:
    """Rename the finished `tmp` onto `out`; only a folder checked as medgen's (`replace`) is replaced."""
    aside = None
    if replace:
        if not has_marker(out):  # it changed since it was checked
            _keep_and_refuse(tmp, out)
        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        os.rename(out, aside)  # onto the empty temp folder: the old output is kept until the new one is in
    try:
        os.rename(tmp, out)  # fails on a non-empty folder: never replaces what appeared meanwhile
    except OSError as e:
        if aside is not None and not out.exists():
            os.rename(aside, out)
            aside = None
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            _keep_and_refuse(tmp, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise MedgenError(describe_os_error(e, default_path=out)) from e
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _keep_and_refuse(tmp: Path, out: Path) -> None:
    kept = out.parent / f"{out.name}.medgen-{os.getpid()}"
    os.rename(tmp, kept)
    raise MedgenError(f"output folder {out} appeared while this run was writing and was left untouched; "
                      f"this run's output is in {kept}")


def current_umask() -> int:
    """The process umask (read from /proc where it can be, else set and restored)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call `write(file)` on a temp file in the target folder, fsync, then os.replace onto `path`.

    The file gets the mode an ordinary open() would give it (0666 less the umask: 0644 under umask 022),
    not mkstemp's private 0600, so that other users can read a run's datalist, config or checkpoints.

    A failed write (disk full, read-only folder, ...) removes the temp file and raises a MedgenError
    naming `path`.

    Args:
        path: the final file.
        write: writes the content into the open binary file it is given.
    Returns:
        The path written.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        err = _write_failure(path, e)
        if err is not None:
            raise err from e
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to `path` atomically."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text (UTF-8) atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON (indented, trailing newline) atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
