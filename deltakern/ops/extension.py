"""Guarded load of the compiled extension ``deltakern._C`` (its ops' Python side is in
``deltakern.ops.registry``).

Importing deltakern never fails because the extension is missing or broken: the reason is kept
and shown by ``deltakern env``, and the scoring functions fall back to the reference backend.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

_module: ModuleType | None = None
_error: str | None = None
_loaded = False


def load() -> ModuleType | None:
    """Import ``deltakern._C`` once; return it, or None when it is unavailable."""
    global _module, _error, _loaded
    if _loaded:
        return _module
    _loaded = True
    if os.environ.get("DELTAKERN_DISABLE_EXT", "0") not in ("0", ""):
        _error = "disabled by DELTAKERN_DISABLE_EXT"
        return None
    try:
        import torch  # noqa: F401 - the extension's symbols resolve against libtorch

        _module = importlib.import_module("deltakern._C")
    except ImportError as exc:
        _error = f"{type(exc).__name__}: {exc}"
        _module = None
    return _module


def available() -> bool:
    """True when the compiled ops are registered under ``torch.ops.deltakern``."""
    return load() is not None


def unavailable_reason() -> str | None:
    """Why the extension could not be loaded (None when it is loaded)."""
    load()
    return _error


def has_cuda_kernels() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    mod = load()
    return bool(mod is not None and mod.built_with_cuda())


def cpu_half_gemm(dtype: str) -> str | None:
    """The GEMM the CPU ops multiply same-dtype ``"bfloat16"`` or ``"float16"`` inputs with on this
    machine: ``"avx512_bf16"`` (deltakern's kernel), ``"mkl"`` (MKL's mixed GEMM) or ``"float32"``
    (rows converted to float32 in cache). Follows ``DELTAKERN_CPU_HALF_GEMM``; None without the
    extension."""
    mod = load()
    return None if mod is None else str(mod.cpu_half_gemm(dtype))


def avx512_bf16_usable() -> bool:
    """True when deltakern's AVX512-BF16 GEMM can run in this process (the CPU has AVX512-BF16 and
    ``ATEN_CPU_CAPABILITY`` allows AVX-512)."""
    mod = load()
    return bool(mod is not None and mod.avx512_bf16_usable())
