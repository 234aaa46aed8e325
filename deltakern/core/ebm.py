"""EBM loss settings shared by the reference and the fused paths: their validation, the mask
count and the reduction (docs/conventions.md §6)."""

from __future__ import annotations

import math

import torch

from deltakern.core.errors import InvalidArgument
from deltakern.core.validation import (
    check_bool,
    check_choice,
    check_finite_number,
    check_inputs,
    check_labels,
    check_open_unit,
    check_positive,
)

TARGETS = ("pred", "label")
CE_ON = ("original", "edited")
REDUCTIONS = ("mean", "sum", "none")
# The largest 1/τ any path accepts: logits are at most 1/τ in magnitude (cosines times 1/τ), and
# with half of float32's range as the bound they, their base-2 form in the Triton kernel
# (times log2(e) < 2) and their log-sum-exps stay finite. A smaller τ (below ~5.9e-39) would
# make every logit inf and every score or loss NaN, on every device.
MAX_INV_TEMPERATURE = float(torch.finfo(torch.float32).max) / 2
MIN_TEMPERATURE = 1.0 / MAX_INV_TEMPERATURE


def check_temperature(name: str, value: object) -> float:
    """``value`` as a float when it is a finite temperature > 0 whose reciprocal leaves float32
    logits finite (τ ≥ :data:`MIN_TEMPERATURE`); otherwise :class:`InvalidArgument` naming ``name``
    (:class:`~deltakern.core.errors.InvalidArgumentType` for a non-number). For the loss and the
    scores alike."""
    value = check_positive(name, value)
    if value < MIN_TEMPERATURE:
        raise InvalidArgument(
            f"{name} must be at least {MIN_TEMPERATURE:.3g}: 1/{name} = {1.0 / value:.3g} overflows "
            f"float32 logits, got {value!r}",
            param=name,
        )
    return value


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
