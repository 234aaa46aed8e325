"""Per-section timing of pipeline work that adds no host syncs, and the manifest's timing fields."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch


class SectionTimer:
    """Seconds per named section; CUDA sections are timed with events, read at :meth:`totals`
    (after the work has been synchronised anyway), so timing adds no host syncs."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = {}
        self._events: list[tuple[str, Any, Any]] = []

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.add(name, time.perf_counter() - t0)

    @contextlib.contextmanager
    def host_section(self, name: str) -> Iterator[None]:
        """Wall-clock seconds of host work (file I/O), whatever the device."""
        t0 = time.perf_counter()
        yield
        self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def totals(self) -> dict[str, float]:
        for name, start, end in self._events:
            end.synchronize()
            self.add(name, start.elapsed_time(end) / 1000.0)
        self._events.clear()
        return dict(self.seconds)


TIMING_KEYS = ("decode_s", "data_wait_s", "encode_s", "score_s", "write_s")


def sum_timings(timings: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: round(sum(t.get(k, 0.0) for t in timings), 6) for k in TIMING_KEYS}
