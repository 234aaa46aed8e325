"""The run directory of a resumable job: one output and one JSON record per finished shard,
and ``run.json`` holding the arguments that shape the output (a rerun with others is refused)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from deltakern.data.atomic import write_json

RUN_FILE = "run.json"


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

    def claim(self, args: dict[str, Any], what: str) -> str | None:
        """Create ``run.json`` with ``args``, or check it matches; the refusal message or None."""
        self.path.mkdir(parents=True, exist_ok=True)
        run_file = self.path / RUN_FILE
        if not run_file.is_file():
            write_json(run_file, {"args": args})
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


# run.json keys whose values are fingerprints, and what a user changed to alter them
_FINGERPRINTS = {
    "images_fingerprint": "the images of --images",
    "features_fingerprint": "the feature shards of --features",
    "classnames_sha256": "the class names (--classes/--imagenet)",
    "templates_sha256": "the prompt templates (--templates)",
    "prompts": "the --prompts checkpoint",
}


def _describe_change(key: str, before: Any, now: Any) -> str:
    if key in _FINGERPRINTS:
        return f"{_FINGERPRINTS[key]} changed"
    return f"--{key.replace('_', '-')}: {before!r} before, {now!r} now"
