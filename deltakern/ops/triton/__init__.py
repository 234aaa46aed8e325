"""Triton kernels, one family per module, imported lazily (only when used).

Nothing here imports triton at package import time; ``triton_status`` says whether the
Triton backend can run on a device without initialising CUDA.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys

import torch


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET=1: kernels then run on CPU tensors (slowly), as in CI."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_active() -> bool:
    """True when kernels will actually be interpreted: TRITON_INTERPRET=1 and triton either not
    imported yet or imported with it (triton fixes the mode at import: its own library
    functions are jitted then)."""
    if not interpreter_enabled():
        return False
    language = sys.modules.get("triton.language")
    return language is None or type(language.zeros).__name__ == "InterpretedFunction"


@functools.lru_cache(maxsize=1)
def _not_installed_reason() -> str | None:
    """Why the kernel cannot be imported, or None. Looked up once: what is installed does not
    change within a process, and the lookup (a walk of sys.path) cost every dk.score call about
    half a millisecond."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if importlib.util.find_spec("deltakern.ops.triton.fused_score") is None:
        return "the Triton scoring kernel is not part of this installation"
    return None


def triton_status(device: torch.device) -> str | None:
    """None when the Triton backend can run on ``device``, otherwise the reason it cannot."""
    missing = _not_installed_reason()
    if missing is not None:
        return missing
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreter_active():
        return None
    if device.type == "cpu" and interpreter_enabled():
        return "TRITON_INTERPRET=1 was set after triton was imported; set it before importing triton"
    return f"Triton runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1), not on {device.type}"
