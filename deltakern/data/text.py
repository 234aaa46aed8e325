"""Small text inputs: class names, templates, vocabularies (one entry per line)."""

from __future__ import annotations

import os

from deltakern.core.errors import InvalidArgument


def read_lines(path: str | os.PathLike, *, name: str = "path") -> list[str]:
    """Non-empty, stripped lines of a UTF-8 text file; lines starting with ``#`` are comments.

    Raises ``ValueError`` naming ``name`` (the caller's argument) when the file is missing,
    unreadable or has no entries.
    """
    if not os.path.isfile(path):
        raise InvalidArgument(f"{name} must be a text file with one entry per line, got {str(path)!r} (no such file)")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{name}: cannot read {str(path)!r} as UTF-8 text ({exc})") from None
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise InvalidArgument(f"{name} file {str(path)!r} has no entries (only blank or # comment lines)")
    return lines
