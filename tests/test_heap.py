"""keep_freed_memory: large blocks stop being faulted in again after every free; off by
environment; a bad value is named. The effect is measured in a subprocess (the setting is
process-wide and cannot be undone) by counting page faults, not by timing."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from deltakern.core.errors import InvalidArgument
from deltakern.runtime import heap

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
BLOCK_PAGES = (64 << 20) // 4096  # a 64 MiB tensor: above glibc's largest automatic mmap threshold (32 MiB)

# Allocates and frees a 64 MiB tensor twelve times, printing whether the setting applied and the
# minor page faults of each round.
PROBE = """
import resource, torch
from deltakern.runtime.heap import keep_freed_memory
applied = keep_freed_memory()
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(16 << 20)  # written, so every page is touched
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, *faults)
"""


def probe(setting: str | None) -> tuple[bool, list[int]]:
    env = {k: v for k, v in os.environ.items() if k != heap.KEEP_FREED_MEMORY_ENV}
    if setting is not None:
        env[heap.KEEP_FREED_MEMORY_ENV] = setting
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120, check=True)
    applied, *faults = out.stdout.split()
    return applied == "True", [int(f) for f in faults]


@pytest.mark.skipif(not GLIBC, reason="the setting exists only for glibc's malloc")
def test_kept_memory_is_not_faulted_in_again():
    applied, faults = probe(None)  # on by default
    assert applied
    # The heap grows for the first round and, depending on where small blocks land around the
    # freed block, again in one or two of the next three (seen up to round 4 in 20 runs of the
    # probe); from then on the block is reused, pages and all.
    assert all(f < BLOCK_PAGES // 20 for f in faults[6:]), faults


@pytest.mark.skipif(not GLIBC, reason="the setting exists only for glibc's malloc")
def test_turned_off_by_the_environment_leaves_glibc_defaults():
    applied, faults = probe("0")
    assert not applied
    # glibc's default: the block gets its own mapping and every round faults all of it in again.
    assert all(f >= BLOCK_PAGES * 0.95 for f in faults), faults


@pytest.mark.parametrize("bad", ["yes", "2", "off"])
def test_bad_environment_value_is_named(monkeypatch, bad):
    monkeypatch.setenv(heap.KEEP_FREED_MEMORY_ENV, bad)
    with pytest.raises(InvalidArgument, match=heap.KEEP_FREED_MEMORY_ENV):
        heap.keep_freed_memory()


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.delenv(heap.KEEP_FREED_MEMORY_ENV, raising=False)
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))  # e.g. musl
    assert heap.keep_freed_memory() is False


def test_status_says_what_the_commands_do(monkeypatch):
    monkeypatch.delenv(heap.KEEP_FREED_MEMORY_ENV, raising=False)
    assert heap.keep_freed_memory_status() == ("on (glibc mallopt)" if GLIBC else "not applied (the C library is not glibc)")
    monkeypatch.setenv(heap.KEEP_FREED_MEMORY_ENV, "0")
    assert heap.keep_freed_memory_status() == f"off ({heap.KEEP_FREED_MEMORY_ENV}=0)"
    monkeypatch.setenv(heap.KEEP_FREED_MEMORY_ENV, "maybe")
    assert heap.keep_freed_memory_status().startswith(f"error: {heap.KEEP_FREED_MEMORY_ENV} must be 0 or 1")
