"""Crash-safe file writes: write a temporary sibling, flush it to disk, rename it into place.

A reader (or a resumed run) therefore sees either the old file or the complete new one, never
a truncated file under the final name. Every module that writes results goes through here.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
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
