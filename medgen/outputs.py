"""Safe output: refuse existing folders, stage then rename, atomic file writes.

Nothing half-written is ever left under a user's output path: folders are built under a hidden
temporary sibling and renamed into place at the end; single files go through temp file + os.replace.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from medgen.errors import MedgenError


def check_output_dir(
    path: str | os.PathLike, overwrite: bool = False, resume: bool | None = None
) -> Path:
    """Refuse an existing, non-empty output folder unless overwrite or resume is set.

    Args:
        path: the output folder.
        overwrite: delete what is there (done only when the new output is complete).
        resume: keep what is there and continue into it; None for commands that cannot resume
            (the error message then does not offer --resume).
    Returns:
        The folder as a Path.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise MedgenError(f"output path {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not (overwrite or resume):
        hint = " or --resume to continue" if resume is not None else ""
        raise MedgenError(f"output folder {out} already exists; pass --overwrite to replace it{hint}")
    return out


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary sibling and move it to `path` only on success.

    Args:
        path: the final folder.
        overwrite: replace an existing folder at `path` once the new one is complete.
    Yields:
        The temporary folder to write into.
    """
    out = check_output_dir(path, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the final folder should get the usual mode
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call `write(file)` on a temp file in the target folder, fsync, then os.replace onto `path`.

    Args:
        path: the final file.
        write: writes the content into the open binary file it is given.
    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
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
