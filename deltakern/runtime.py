"""Where and how a pipeline process runs: device, autocast precision, torchrun ranks, and
per-section timing that adds no host syncs."""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from ._validation import check_choice

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DIST_TIMEOUT_ENV = "DELTAKERN_DIST_TIMEOUT_S"


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


# ---- runtime: device, precision, ranks ----------------------------------------------------------


@dataclass
class Runtime:
    """Where and how this process runs: device, autocast dtype, rank and world size."""

    device: torch.device
    precision: str  # resolved: fp32, bf16 or fp16
    rank: int = 0
    world_size: int = 1
    owns_process_group: bool = False

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    def autocast(self):
        dtype = self.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (a collective: it also waits for all ranks, like a barrier)."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_process_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def make_runtime(device: str = "auto", precision: str = "auto", dist_backend: str | None = None) -> Runtime:
    """Resolve the device and precision; join the process group when started by ``torchrun``.

    ``device="auto"`` is CUDA when available (``cuda:LOCAL_RANK`` under torchrun), else CPU.
    ``precision="auto"`` is bf16 autocast on CUDA (fp16 where bf16 is unsupported), fp32 on CPU.
    """
    check_choice("precision", precision, PRECISIONS)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not isinstance(device, str) or not device:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was requested but CUDA is not available; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if precision == "auto":
        precision = "fp32"
        if dev.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    rt = Runtime(device=dev, precision=precision)
    if world_size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = dist_backend or ("nccl" if dev.type == "cuda" else "gloo")
            timeout = datetime.timedelta(seconds=float(os.environ.get(DIST_TIMEOUT_ENV, "7200")))
            dist.init_process_group(backend=backend, timeout=timeout)
            rt.owns_process_group = True
        rt.rank, rt.world_size = dist.get_rank(), dist.get_world_size()
    return rt
