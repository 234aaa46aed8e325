"""Which dtype a computation accumulates in, and how rows are prepared for cosine logits."""

from __future__ import annotations

import torch


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (half inputs accumulate in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def prepare_rows(t: torch.Tensor, dtype: torch.dtype, normalize: bool) -> torch.Tensor:
    """Upcast rows (a new tensor) and scale them to unit L2 norm when asked."""
    t = t.to(dtype)
    if normalize:
        t = t / torch.linalg.vector_norm(t, dim=1, keepdim=True)
    return t
