"""Crash-safe file writes: write a temporary sibling, flush it to disk, rename it into place.

A reader (or a resumed run) therefore sees either the old file or the complete new one, never
a truncated file under the final name. Every module that writes results goes through here. A
write the file system refuses (disk full, no permission, read-only directory) raises
:class:`WriteFailed` naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deltakern.core.errors import DeltakernError

# errno values that mean "this output cannot be written here" (as opposed to a bug): disk full,
# quota, permissions, read-only file system, file too large, I/O error.
WRITE_ERRNOS = frozenset(
    e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG, errno.EIO)
    if e is not None
)


class WriteFailed(DeltakernError, OSError):
    """Writing an output file failed (disk full, no permission, read-only directory).

    Nothing was written under the file's name: the old file, if any, is intact and the
    temporary file is removed, so a rerun after the cause is fixed resumes.
    """

    def __init__(self, path: str | os.PathLike, cause: OSError) -> None:
        reason = cause.strerror or str(cause)
        code = errno.errorcode.get(cause.errno or -1)
        super().__init__(
            f"cannot write {os.fspath(path)}: {reason}{f' ({code})' if code else ''}; nothing was written "
            "under that name. Free space or fix the permissions, then rerun the same command to resume."
        )
        self.errno = cause.errno
        self.filename = os.fspath(path)

    def __str__(self) -> str:  # OSError's own format would show "[Errno N] None: path"
        return str(self.args[0])


def _is_write_failure(exc: BaseException) -> bool:
    """An OSError that says the file system refused the write (also when a writer library like
    pyarrow kept only the message, not the errno)."""
    if not isinstance(exc, OSError) or isinstance(exc, WriteFailed):
        return False
    if exc.errno in WRITE_ERRNOS:
        return True
    message = str(exc)
    return any(os.strerror(e) in message for e in WRITE_ERRNOS)


def _read_umask() -> int:
    """The process umask, read without changing it where Linux reports it (``/proc``); elsewhere
    set-and-restore once, at import, before any writer thread can exist."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; results are ordinary files, so they get the mode the umask gives.
# Read once: flipping the umask on every write would race with threads creating files.
_FILE_MODE = 0o666 & ~_read_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that needs a file name (pyarrow,
    safetensors, torch.save, ...). When the block succeeds the file is synced and renamed to
    ``path``; when it raises, the temporary file is removed and ``path`` is left untouched.
    Temporary files are named ``.{name}.*.tmp``: :func:`remove_stale_temporaries` finds the
    ones a killed process left behind."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        if _is_write_failure(exc):
            raise WriteFailed(path, exc) from exc
        raise
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if _is_write_failure(exc):
            raise WriteFailed(path, exc) from exc  # type: ignore[arg-type]
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns ``path``."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> Path:
    """Write ``obj`` as JSON (``json.dumps`` keyword arguments pass through) atomically."""
    return write_text(path, json.dumps(obj, **dumps_kwargs) + "\n")


def remove_stale_temporaries(directory: str | os.PathLike, name: str = "*") -> int:
    """Delete the temporary files :func:`atomic_path` left in ``directory`` for files matching
    ``name`` (a glob) when its process was killed mid-write; returns how many were removed.
    Call it only while no other process writes there (a run holds its output's lock)."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    removed = 0
    for tmp in directory.glob(f".{name}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed += 1
    return removed
