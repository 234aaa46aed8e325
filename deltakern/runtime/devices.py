"""Where and how a process runs: device, autocast precision, torchrun ranks and the process
group. One implementation for encode, score and prompt tuning."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from deltakern.core.constants import DEFAULT_DIST_TIMEOUT_S, DIST_TIMEOUT_ENV, PRECISIONS
from deltakern.core.errors import DeltakernError, InvalidArgument
from deltakern.core.validation import check_choice


def resolve_device(device: str | torch.device = "auto", *, local_rank: int | None = None) -> torch.device:
    """The torch device ``device`` names: ``"auto"`` is CUDA when available, else CPU; a bare
    ``"cuda"`` becomes ``cuda:LOCAL_RANK`` under torchrun (``local_rank``), else the current
    CUDA device. Raises ``ValueError`` naming ``device`` for anything else or for CUDA without a
    GPU. Does not initialise CUDA unless a CUDA device is asked for or chosen."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str) or not device:
        raise InvalidArgument(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InvalidArgument(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgument(f"device {device!r} was requested but CUDA is not available; use device 'cpu'")
        if dev.index is None:
            dev = torch.device("cuda", local_rank if local_rank is not None else torch.cuda.current_device())
    elif dev.type != "cpu":
        raise InvalidArgument(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return dev


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bfloat16 natively (AMX tiles or AVX512-BF16), as torch
    reports it; bf16 autocast is then faster than float32 on the CPU, elsewhere it is slower."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``precision`` (one of :data:`~deltakern.core.constants.PRECISIONS`) resolved for
    ``device``: ``"auto"`` is bf16 autocast on CUDA (fp16 where bf16 is unsupported), bf16 on
    CPUs with native bf16 (:func:`cpu_has_native_bf16`), fp32 on other CPUs."""
    check_choice("precision", precision, PRECISIONS)
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None for fp32: no autocast)."""
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """An autocast context for a resolved precision on ``device`` (a no-op for fp32)."""
    dtype = autocast_dtype(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def dist_timeout() -> datetime.timedelta:
    """How long collectives wait for peers: ``$DELTAKERN_DIST_TIMEOUT_S`` seconds (default 7200)."""
    raw = os.environ.get(DIST_TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw else DEFAULT_DIST_TIMEOUT_S
    except ValueError:
        raise InvalidArgument(f"{DIST_TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    return datetime.timedelta(seconds=seconds)


@dataclass
class Runtime:
    """Where and how this process runs: device, autocast precision, rank and world size."""

    device: torch.device
    precision: str  # resolved: fp32, bf16 or fp16
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_process_group: bool = False

    @property
    def main(self) -> bool:
        """True on rank 0 (the process that writes shared outputs and prints)."""
        return self.rank == 0

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return autocast_dtype(self.precision)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.precision)

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

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The sum of ``values`` over all ranks (a new tensor; ``values`` is not modified)."""
        if self.world_size == 1:
            return values
        import torch.distributed as dist

        values = values.clone()
        dist.all_reduce(values)
        return values

    def close(self, *, barrier: bool = False) -> None:
        """Leave the process group this runtime joined; ``barrier`` first waits for every rank
        (only after a success: after a failure the other ranks may never arrive)."""
        if self.owns_process_group:
            import torch.distributed as dist

            if barrier:
                dist.barrier()
            dist.destroy_process_group()
            self.owns_process_group = False


@contextlib.contextmanager
def on_rank0(rt: Runtime, make_context: Callable[[], contextlib.AbstractContextManager]) -> Iterator[None]:
    """Enter ``make_context()`` on rank 0 only (an output lock, say) for the block. When it
    raises a deltakern error, every rank raises it, instead of rank 0 failing alone while the
    others wait for it in a collective."""
    with contextlib.ExitStack() as stack:
        refusal: DeltakernError | None = None
        if rt.rank == 0:
            try:
                stack.enter_context(make_context())
            except DeltakernError as exc:
                refusal = exc
        message = rt.broadcast(None if refusal is None else str(refusal))
        if refusal is not None:
            raise refusal
        if message is not None:
            raise InvalidArgument(message, param="out")
        yield


def make_runtime(device: str = "auto", precision: str = "auto", dist_backend: str | None = None) -> Runtime:
    """Resolve the device and precision; join the process group when started by ``torchrun``.

    ``device="auto"`` is CUDA when available (``cuda:LOCAL_RANK`` under torchrun), else CPU.
    ``precision="auto"`` is resolved by :func:`resolve_precision`. Under torchrun (``WORLD_SIZE > 1``) the process group is joined with ``dist_backend``
    (default nccl on CUDA, gloo on CPU) and the :func:`dist_timeout`; a group that is already
    initialised is used as it is and left open by :meth:`Runtime.close`.
    """
    check_choice("precision", precision, PRECISIONS)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank=local_rank if world_size > 1 else None)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    rt = Runtime(device=dev, precision=resolve_precision(precision, dev), local_rank=local_rank)
    import torch.distributed as dist

    if world_size > 1 or (dist.is_available() and dist.is_initialized()):
        if not dist.is_initialized():
            backend = dist_backend or ("nccl" if dev.type == "cuda" else "gloo")
            dist.init_process_group(backend=backend, timeout=dist_timeout())
            rt.owns_process_group = True
        rt.rank, rt.world_size = dist.get_rank(), dist.get_world_size()
    return rt
