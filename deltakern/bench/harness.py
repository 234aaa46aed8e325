"""The benchmark harness: how every deltakern benchmark takes its numbers.

Every benchmark (``deltakern bench``, the scripts in ``bench/`` and the pytest-benchmark suite)
measures through this module, so numbers are taken the same way on every machine:

- **time**: on CPU, ``time.perf_counter`` around each call after a warm-up, repeated until both
  a minimum count and a minimum total time are reached; on CUDA, ``triton.testing.do_bench``
  (CUDA events, L2 flushed between calls) or plain CUDA events when Triton is missing. The
  median and the 20%/80% quantiles are reported.
- **peak memory**: on CUDA the caching allocator's peak above what was allocated before the
  call; on CPU the peak resident set size of a child process running the case, minus the child's
  resident size after it created the inputs and ran one warm-up call ("peak extra memory"). The
  child resets the kernel's high-water mark (``/proc/self/clear_refs``) so one child serves
  many cases; where that is not possible each case gets a fresh child.
- **environment**: device name, versions and git commit recorded with every row.

Result rows, derived throughput and their files are in ``deltakern.bench.results``.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import math
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltakern.core.errors import InvalidArgument

# ----------------------------------------------------------------------------- environment


def cpu_name() -> str:
    """The CPU model name (from /proc/cpuinfo where available)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: str | torch.device) -> str:
    """A human name of the device: the CPU model (with the thread count) or the GPU's name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def git_commit() -> str | None:
    """The checkout's commit (``+dirty`` when it has changes), or None outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


def _triton_version() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """The fields every result row carries: versions, commit, threads and a timestamp."""
    from deltakern._version import __version__

    return {
        "deltakern": __version__,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    """Times of one benchmarked callable, in milliseconds."""

    median_ms: float
    q20_ms: float
    q80_ms: float
    min_ms: float
    mean_ms: float
    repeats: int
    timer: str


@dataclass(frozen=True)
class TimingConfig:
    """How long to measure: CPU uses the repeat/time bounds, CUDA the do_bench budgets (ms)."""

    warmup: int = 1
    min_repeats: int = 3
    max_repeats: int = 50
    min_time_s: float = 1.0
    gpu_warmup_ms: float = 25.0
    gpu_rep_ms: float = 100.0


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of sorted values (numpy's default rule)."""
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times_ms: Iterable[float], timer: str) -> Timing:
    """Median, 20%/80% quantiles, min and mean of per-call times."""
    values = sorted(float(t) for t in times_ms)
    if not values:
        raise InvalidArgument("times_ms must hold at least one measurement, got none")
    return Timing(
        median_ms=statistics.median(values),
        q20_ms=_quantile(values, 0.2),
        q80_ms=_quantile(values, 0.8),
        min_ms=values[0],
        mean_ms=statistics.fmean(values),
        repeats=len(values),
        timer=timer,
    )


def time_cpu(fn: Callable[[], Any], config: TimingConfig = TimingConfig()) -> Timing:
    """Time ``fn`` with ``time.perf_counter``: warm-up calls, then at least ``min_repeats``
    calls and at least ``min_time_s`` seconds (at most ``max_repeats`` calls)."""
    for _ in range(config.warmup):
        fn()
    times: list[float] = []
    spent = 0.0
    while len(times) < config.min_repeats or (spent < config.min_time_s and len(times) < config.max_repeats):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        times.append(elapsed * 1e3)
        spent += elapsed
    return summarize(times, "perf_counter")


def time_cuda(fn: Callable[[], Any], config: TimingConfig = TimingConfig()) -> Timing:
    """Time ``fn`` on the current CUDA stream: ``triton.testing.do_bench`` (which flushes the L2
    cache between calls) when Triton is installed and a call is shorter than ``gpu_rep_ms``;
    otherwise CUDA events around each of ``min_repeats`` or more calls."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    # do_bench spends 5 calls estimating and at least 2 more; for calls slower than the whole
    # repetition budget a few event-timed calls give the same median at a fraction of the cost.
    if do_bench is not None and start.elapsed_time(end) < config.gpu_rep_ms:
        times = do_bench(fn, warmup=config.gpu_warmup_ms, rep=config.gpu_rep_ms, return_mode="all")
        return summarize(times, "do_bench")
    times = []
    spent_ms = 0.0
    while len(times) < config.min_repeats or (spent_ms < config.gpu_rep_ms and len(times) < config.max_repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        spent_ms += times[-1]
    return summarize(times, "cuda_events")


def time_call(fn: Callable[[], Any], device: str | torch.device, config: TimingConfig = TimingConfig()) -> Timing:
    """Time ``fn`` with the timer that suits ``device``."""
    if torch.device(device).type == "cuda":
        return time_cuda(fn, config)
    return time_cpu(fn, config)


# ----------------------------------------------------------------------------- memory

_KB = 1024


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak resident size to its current size (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    hwm, rss = _proc_status_kb("VmHWM"), _proc_status_kb("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 64


def _release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so that the baseline is the
    memory really held and the next call's allocations show up in the peak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_extra(fn: Callable[[], Any]) -> tuple[float, str]:
    """Peak resident memory (bytes) of one call of ``fn`` above the memory held before it.

    Meant to run in a child process that holds only the case's inputs. Returns the bytes and
    the method: ``child_rss_hwm`` (high-water mark reset before the call) or
    ``child_ru_maxrss`` (process peak so far; an upper bound of the baseline, used when the
    reset is unavailable).
    """
    import resource

    _release_free_memory()
    if _reset_peak_rss():
        base = _proc_status_kb("VmRSS")
        fn()
        peak = _proc_status_kb("VmHWM")
        return float(max(peak - base, 0) * _KB), "child_rss_hwm"
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(max(peak - base, 0) * _KB), "child_ru_maxrss"


def peak_rss_reset_supported() -> bool:
    """True when this process can reset its peak RSS, so one child can measure many cases."""
    return _reset_peak_rss()


def _child_measure(factory: Callable[..., Callable[[], Any]], args: tuple, threads: int, warmup: bool) -> tuple[float, str]:
    """Runs in the child: build the call, warm it up once, measure one call's peak extra RSS."""
    torch.set_num_threads(threads)
    call = factory(*args)
    if warmup:
        call()  # lazy initialisation and compilation are not the call's memory
    return peak_rss_extra(call)


class ChildMemory:
    """A spawned child process that measures the peak extra resident memory of CPU calls.

    ``measure(factory, *args)`` runs ``factory(*args)`` in the child (a module-level function
    that creates the inputs and returns the zero-argument call to measure), warms the call up
    once, and returns ``(bytes, method)`` for one more call. One child serves every measurement
    when it can reset its peak RSS; otherwise each gets a fresh child, so that a peak is never
    an earlier measurement's. A child that dies (e.g. killed for memory) is replaced.
    """

    def __init__(self) -> None:
        self._pool: Any = None
        self._failed: str | None = None  # a child that cannot start will not start next time

    def _executor(self):
        import concurrent.futures
        import multiprocessing

        if self._failed:
            raise RuntimeError(self._failed)
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")  # never fork a process with OpenMP threads
            self._pool = concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx)
            try:
                reusable = self._pool.submit(peak_rss_reset_supported).result()
            except Exception as exc:
                self.close()
                self._failed = f"the memory-measuring child process could not start ({type(exc).__name__}: {exc})"
                raise RuntimeError(self._failed) from None
            if not reusable:
                self._pool.shutdown()
                self._pool = concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx, max_tasks_per_child=1)
        return self._pool

    def measure(self, factory: Callable[..., Callable[[], Any]], *args: Any, warmup: bool = True) -> tuple[float, str]:
        """Peak extra bytes of one call of ``factory(*args)`` in the child, and the method."""
        from concurrent.futures.process import BrokenProcessPool

        pool = self._executor()
        try:
            return pool.submit(_child_measure, factory, args, torch.get_num_threads(), warmup).result()
        except BrokenProcessPool:
            self.close()
            raise RuntimeError("the memory-measuring child process died (out of memory?)") from None

    def close(self) -> None:
        """Stop the child process."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "ChildMemory":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def peak_cuda_extra(fn: Callable[[], Any], device: str | torch.device) -> float:
    """Peak CUDA allocator memory (bytes) of one call of ``fn`` above what was allocated before."""
    device = torch.device(device)
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return float(max(peak - base, 0))


