"""The exception type that the CLI turns into a single clear error line, and one-line explanations."""

from __future__ import annotations

import errno
import os


class MedgenError(Exception):
    """A known, user-facing error (bad input, missing file, refused output folder).

    The message must be one line that names the file, row or key at fault.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up runs (the CLI exits 143)."""


_OS_REASONS = {
    errno.ENOSPC: "no space left on device; free some space or choose another --out",
    errno.EDQUOT: "disk quota exceeded; free some space or choose another --out",
    errno.EROFS: "read-only file system; choose a writable --out",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ELOOP: "too many levels of symbolic links (a symlink loop?)",
    errno.EISDIR: "is a folder, expected a file",
    errno.ENOTDIR: "a part of this path is a file, not a folder",
    errno.EEXIST: "exists already (a file where a folder should be?)",
    errno.ENAMETOOLONG: "file name too long",
    errno.ENOENT: "no such file or folder",
    errno.EIO: "input/output error (failing disk or network share?)",
}


def describe_os_error(e: OSError, default_path: str | os.PathLike | None = None) -> str:
    """One line for an OSError: the file it concerns and what went wrong."""
    where = e.filename if e.filename is not None else default_path
    reason = _OS_REASONS.get(e.errno or -1) or (e.strerror or str(e) or type(e).__name__)
    if isinstance(where, bytes):
        where = where.decode(errors="replace")
    return f"{where}: {reason}" if where is not None else reason


def explain(e: BaseException) -> str | None:
    """A clear one-line message for an unexpected exception of a known kind, or None."""
    if isinstance(e, OSError):
        return describe_os_error(e)
    if isinstance(e, RecursionError):
        return "an input is nested too deeply to read (a malformed or hostile JSON/YAML file?)"
    if isinstance(e, MemoryError):
        return "out of memory; ask for less (a smaller --n, --batch-size or image size)"
    text = str(e)
    if isinstance(e, RuntimeError) and ("PytorchStreamWriter" in text or "inline_container" in text):
        return "writing a checkpoint failed (disk full or not writable?); free some space or choose another --out"
    if type(e).__name__ == "OutOfMemoryError" or "CUDA out of memory" in text:
        return "the device ran out of memory; use a smaller --batch-size or image size"
    return None
