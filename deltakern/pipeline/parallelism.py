"""How many DataLoader decode workers and torch intra-op threads a run uses.

On a CPU run the encoder and the decode workers share the same cores. Today's GPU default
(``min(8, cores)`` workers, torch's own thread count) then oversubscribes them: on 2 cores, 2
workers beside 2 torch threads ran end to end at 62% of the encoder's standalone rate, 1 worker
at 92%. So on the CPU the two are chosen together (:func:`choose_parallelism`): few workers,
because decoding a typical photo costs a small fraction of encoding it, and torch keeps every
core, because the workers sleep once their prefetch queue is full. An explicit ``workers`` is
kept as given and torch's thread count is then left alone.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from deltakern.core.validation import check_int_range

MAX_DEFAULT_WORKERS = 8
CPU_CORES_PER_WORKER = 4  # on a CPU run, one decode worker per this many cores (at least one)

RULE_HELP = (
    "default: on a CPU run 1 per 4 cores (at least 1) with torch using every core; on a GPU run "
    "min(8, cores); an explicit value is kept and torch's thread count left alone"
)


@dataclass(frozen=True)
class Parallelism:
    """Decode workers and torch intra-op threads of a run, and which rule chose them."""

    workers: int
    torch_threads: int | None  # None: leave torch's thread count as it is
    rule: str  # "cpu-auto", "gpu-auto" or "explicit"

    def describe(self) -> dict[str, Any]:
        """For the manifest: the choice, with the thread count actually in force."""
        d = asdict(self)
        d["torch_threads"] = self.torch_threads if self.torch_threads is not None else torch.get_num_threads()
        return d


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def choose_parallelism(cores: int, device_type: str, workers: int | None = None) -> Parallelism:
    """The decode workers and torch threads for a run on ``device_type`` ("cpu" or "cuda")
    with ``cores`` CPU cores; ``workers`` is the user's explicit choice or None.

    - explicit ``workers``: kept; torch's thread count untouched;
    - CPU: ``max(1, cores // 4)`` workers (at most 8), torch threads = ``cores``;
    - GPU: ``min(8, cores)`` workers, torch's thread count untouched (the encoder is on the GPU).
    """
    cores = check_int_range("cores", cores, 1, 1 << 20)
    if workers is not None:
        return Parallelism(check_int_range("workers", workers, 0, 1024), None, "explicit")
    if device_type == "cpu":
        return Parallelism(min(MAX_DEFAULT_WORKERS, max(1, cores // CPU_CORES_PER_WORKER)), cores, "cpu-auto")
    return Parallelism(min(MAX_DEFAULT_WORKERS, cores), None, "gpu-auto")


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (unchanged when None), then restore the
    previous count: a library call must not leave the process's thread count changed."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
