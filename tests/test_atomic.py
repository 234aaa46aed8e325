"""Crash-safe writes: a failed write leaves the old file and no temporary files behind."""

from __future__ import annotations

import json
import os

import pytest

from deltakern.data.atomic import atomic_path, write_json, write_text


def test_write_replaces_whole_file_with_usual_mode(tmp_path):
    target = tmp_path / "sub" / "result.json"
    write_json(target, {"a": 1})
    write_json(target, {"b": 2})
    assert json.loads(target.read_text()) == {"b": 2}
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600
    assert [p.name for p in target.parent.iterdir()] == ["result.json"]


def test_failed_write_keeps_the_old_file_and_cleans_up(tmp_path):
    target = tmp_path / "report.md"
    write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("crash in the middle")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]
