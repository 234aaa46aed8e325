"""The run directory of a resumable job: one output and one JSON record per finished shard,
``run.json`` holding the arguments that shape the output (a rerun with others is refused), and
a lock file that keeps two runs from writing one output at the same time."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deltakern.core.errors import InvalidArgument
from deltakern.data.atomic import WriteFailed, write_json

RUN_FILE = "run.json"
LOCK_FILE = ".deltakern.lock"


class RunLocked(InvalidArgument):
    """Another process holds the run directory's lock (it is writing the same output)."""


@contextlib.contextmanager
def output_lock(lock_path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` for the block, or raise :class:`RunLocked` at once.

    ``flock``: the operating system releases it when the holder exits, however it exits, so a
    killed run never leaves its output locked. Creating the lock file's directory and the file is
    also the check that the output can be written at all
    (:class:`~deltakern.data.atomic.WriteFailed` otherwise).
    """
    try:
        import fcntl
    except ImportError:  # no flock on this platform: run unlocked
        yield
        return
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise WriteFailed(lock_path, exc) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            raise RunLocked(
                f"{what} is already running (process {holder or 'unknown'} holds {lock_path}); two runs "
                "must not write one output. Wait for it to finish, or choose another --out.",
                param="out",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class RunDir:
    """A directory of per-shard outputs ``{prefix}-{i:05d}{suffix}`` and their JSON records."""

    def __init__(self, path: str | os.PathLike, prefix: str, suffix: str):
        self.path = Path(path)
        self.prefix, self.suffix = prefix, suffix

    def output(self, index: int) -> Path:
        return self.path / f"{self.prefix}-{index:05d}{self.suffix}"

    def record_path(self, index: int) -> Path:
        return self.path / f"{self.prefix}-{index:05d}.json"

    def is_done(self, index: int) -> bool:
        return self.record_path(index).is_file() and self.output(index).is_file()

    def record(self, index: int) -> dict[str, Any]:
        return read_json(self.record_path(index))

    def write_record(self, index: int, record: dict[str, Any]) -> None:
        write_json(self.record_path(index), record)

    def lock(self, what: str) -> contextlib.AbstractContextManager:
        """Hold the directory's lock (``.deltakern.lock``) for the block, or raise
        :class:`RunLocked` at once (:func:`output_lock`)."""
        return output_lock(self.path / LOCK_FILE, what)

    def check(self, args: dict[str, Any], what: str) -> str | None:
        """The refusal message when ``run.json`` records other arguments than ``args``, else None."""
        run_file = self.path / RUN_FILE
        if not run_file.is_file():
            return None
        previous = read_json(run_file).get("args", {})
        changed = [
            _describe_change(k, previous.get(k), args.get(k))
            for k in sorted(set(previous) | set(args))
            if previous.get(k) != args.get(k)
        ]
        if not changed:
            return None
        return (
            f"{what} in {self.path} was started with different arguments; refusing to mix them "
            f"({'; '.join(changed)}). Rerun with the original arguments to resume, or choose "
            f"another --out (or delete {self.path}) to start over."
        )

    def claim(self, args: dict[str, Any], what: str) -> str | None:
        """Create ``run.json`` with ``args``, or check it matches; the refusal message or None."""
        message = self.check(args, what)
        if message is None and not (self.path / RUN_FILE).is_file():
            write_json(self.path / RUN_FILE, {"args": args})
        return message


# run.json keys whose values are fingerprints, and what a user changed to alter them
_FINGERPRINTS = {
    "images_fingerprint": "the images of --images",
    "features_fingerprint": "the feature shards of --features",
    "classnames_sha256": "the class names (--classes/--imagenet)",
    "templates_sha256": "the prompt templates (--templates)",
    "prompts": "the --prompts checkpoint",
    "negative_labels_sha256": "the negative-label vocabulary (--negative-labels)",
    "negative_templates_sha256": "the templates of the negative labels (--templates)",
}


def _describe_change(key: str, before: Any, now: Any) -> str:
    if key in _FINGERPRINTS:
        return f"{_FINGERPRINTS[key]} changed"
    return f"--{key.replace('_', '-')}: {before!r} before, {now!r} now"
