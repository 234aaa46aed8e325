"""Keep freed C-heap memory mapped in a process that runs the image encoder.

PyTorch allocates CPU tensors with ``malloc``. glibc serves every block above its mmap threshold
(128 KiB, rising to at most 32 MiB as blocks are freed) with a fresh ``mmap`` and returns it to
the kernel on ``free``, and trims the heap's free top above 128 KiB. An encoder's activations are
megabytes each and are freed after every layer, so each batch faults all of them in again page by
page: a process encoding 1,536 images with ViT-B-32 at batch 64 (bf16 autocast, 2-core Zen 4)
took 15 million page faults and 34 seconds in the kernel beside 122 in user code, and encoded
20-21 images/s. Serving large blocks from the heap and keeping its free top lets later batches
reuse the pages already mapped: 0.4 million faults, 1.6 seconds in the kernel, 26.5 images/s
(bench/RESULTS.md has the measurements).

The price is that the process keeps its peak heap until it exits instead of returning the
activations' pages between batches, which is what a caching allocator does anyway (peak resident
memory 5-28% higher in the benchmarks). The setting is process-wide and cannot be
undone, so the library never applies it on its own: ``deltakern score`` and ``deltakern encode``
call :func:`keep_freed_memory` once at start-up, and a program that embeds the pipeline may call
it too. ``deltakern train`` does not (prompt tuning gained without cached image features and
lost with them). ``DELTAKERN_KEEP_FREED_MEMORY=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import platform

from deltakern.core.errors import InvalidArgument
from deltakern.core.validation import env_switch

KEEP_FREED_MEMORY_ENV = "DELTAKERN_KEEP_FREED_MEMORY"

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to 1 GiB come from the heap (larger ones are rare on a CPU run and still get their
# own mapping); up to 2 GiB - 1 (mallopt takes an int) of free heap top is kept, not trimmed.
MMAP_THRESHOLD_BYTES = 1 << 30
TRIM_THRESHOLD_BYTES = (1 << 31) - 1


def keep_freed_memory_enabled() -> bool:
    """Whether ``$DELTAKERN_KEEP_FREED_MEMORY`` allows the setting (unset, empty, ``1``: yes; ``0``: no)."""
    return env_switch(KEEP_FREED_MEMORY_ENV)


def _glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def keep_freed_memory_status() -> str:
    """What :func:`keep_freed_memory` does in this environment, in words (``deltakern env``
    shows it); never raises: an invalid ``$DELTAKERN_KEEP_FREED_MEMORY`` is reported."""
    try:
        enabled = keep_freed_memory_enabled()
    except InvalidArgument as exc:
        return f"error: {exc}"
    if not enabled:
        return f"off ({KEEP_FREED_MEMORY_ENV}=0)"
    return "on (glibc mallopt)" if _glibc() else "not applied (the C library is not glibc)"


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` serve blocks up to 1 GiB from the heap and keep freed heap memory
    mapped, for the rest of the process (see the module docstring for why and what it costs).

    Returns True when applied; False when ``$DELTAKERN_KEEP_FREED_MEMORY`` is ``0`` or the C
    library is not glibc (musl, macOS and Windows have other allocators and are left as they are).
    Safe to call more than once. DataLoader workers forked afterwards inherit the setting.
    """
    if not keep_freed_memory_enabled() or not _glibc():
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the process's own C library, the one torch allocates from
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; either setting also stops glibc's threshold from adapting.
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
