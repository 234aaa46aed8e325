"""How a process runs: device and precision resolution, torchrun ranks, section timing, and
(``runtime.heap``) keeping freed C-heap memory in a process that runs the encoder. Shared by the
pipeline, prompt tuning and the commands; depends on ``deltakern.core`` only."""

from deltakern.runtime.devices import (
    Runtime,
    autocast,
    autocast_dtype,
    cpu_has_native_bf16,
    dist_timeout,
    make_runtime,
    on_rank0,
    resolve_device,
    resolve_precision,
)
from deltakern.runtime.timing import TIMING_KEYS, SectionTimer, sum_timings

__all__ = [
    "TIMING_KEYS", "Runtime", "SectionTimer", "autocast", "autocast_dtype", "cpu_has_native_bf16", "dist_timeout", "make_runtime", "on_rank0",
    "resolve_device", "resolve_precision", "sum_timings",
]
