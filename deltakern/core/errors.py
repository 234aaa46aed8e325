"""deltakern's own error types.

They subclass the built-in types the public API documents (``ValueError``, ``TypeError``,
``FileNotFoundError``), so ``except ValueError`` keeps working, and they let the command line tell
a caller's mistake (printed as one line) from a bug (a traceback). ``param`` names the argument
the error is about, when there is one, so the command line can name its flag instead.
"""

from __future__ import annotations


class DeltakernError(Exception):
    """Base class of the errors deltakern raises about its inputs."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidArgument(DeltakernError, ValueError):
    """An argument has a value deltakern cannot use."""


class InvalidArgumentType(DeltakernError, TypeError):
    """An argument has a type deltakern cannot use."""


class InputNotFound(DeltakernError, FileNotFoundError):
    """A file or directory named by an argument does not exist."""
