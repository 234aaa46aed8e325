"""EBM loss settings shared by the reference and the fused paths: their validation, the mask
count and the reduction (docs/conventions.md §6)."""

from __future__ import annotations

import math

import torch

from deltakern.core.constants import MAX_INV_TEMPERATURE, MIN_TEMPERATURE  # noqa: F401 - re-exported
from deltakern.core.validation import (
    check_bool,
    check_choice,
    check_finite_number,
    check_inputs,
    check_labels,
    check_open_unit,
    check_temperature,
)

TARGETS = ("pred", "label")
CE_ON = ("original", "edited")
REDUCTIONS = ("mean", "sum", "none")


def masked_count(mask_ratio: float, dim: int) -> int:
    """``⌈mask_ratio · dim⌉``: how many product entries the mask zeroes (1 ≤ count ≤ dim).

    The product is rounded to 9 decimals first, so that a ratio typed as 0.3 with dim 10 masks
    3 entries (0.3 · 10 is 3.0000000000000004 in binary floating point).
    """
    return min(dim, max(1, math.ceil(round(mask_ratio * dim, 9))))


def validate_settings(
    *,
    temperature: object,
    lam: object,
    mask_ratio: object,
    reset: object,
    target: object,
    ce_on: object,
    normalize: object,
    reduction: object,
    return_parts: object,
) -> dict:
    """Check the scalar settings of the EBM loss (docs/conventions.md §8); return them as plain types."""
    return dict(
        temperature=check_temperature("temperature", temperature),
        lam=check_finite_number("lam", lam),
        mask_ratio=check_open_unit("mask_ratio", mask_ratio),
        reset=check_finite_number("reset", reset),
        target=check_choice("target", target, TARGETS),
        ce_on=check_choice("ce_on", ce_on, CE_ON),
        normalize=check_bool("normalize", normalize),
        reduction=check_choice("reduction", reduction, REDUCTIONS),
        return_parts=check_bool("return_parts", return_parts),
    )


def validate(X: object, W: object, labels: object, **settings: object) -> dict:
    """Check every argument of the EBM loss (docs/conventions.md §8); return the settings as plain types
    plus ``labels`` as int64."""
    normalize = check_bool("normalize", settings.get("normalize"))
    X, W = check_inputs(X, W, normalize=normalize)
    labels = check_labels(labels, X.shape[0], W.shape[0], X.device)
    return dict(labels=labels, **validate_settings(**settings))


def reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply ``reduction`` ("mean", "sum" or "none") to per-row values."""
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


def combine(
    ce: torch.Tensor, delta: torch.Tensor, *, lam: float, reduction: str, return_parts: bool
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``reduce(ce + lam·delta)`` and, when asked, the reduced parts."""
    loss = reduce(ce + lam * delta, reduction)
    if not return_parts:
        return loss
    return loss, {"ce": reduce(ce, reduction), "delta": reduce(delta, reduction)}
