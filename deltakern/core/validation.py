"""Input checks shared by every public entry point (docs/conventions.md §8).

Each check raises ``ValueError`` (or ``TypeError`` for a wrong type) with a message that names
the argument, what was expected and what was received. Checks never modify their inputs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence

import torch

from deltakern.core.constants import MIN_TEMPERATURE
from deltakern.core.dtypes import row_max_abs
from deltakern.core.errors import InvalidArgument, InvalidArgumentType

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentType(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_matrix(name: str, t: object) -> torch.Tensor:
    """A 2-D, non-empty floating tensor (structure only: cheap, no pass over the values)."""
    t = check_tensor(name, t)
    if t.dim() != 2:
        raise InvalidArgument(f"{name} must be 2-D [rows, D], got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise InvalidArgumentType(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {t.dtype}"
        )
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise InvalidArgument(f"{name} must have at least one row and one column, got shape {tuple(t.shape)}")
    return t


def check_values(
    name: str, t: torch.Tensor, *, normalize: bool, rescales_rows: bool = False, amax: torch.Tensor | None = None
) -> torch.Tensor:
    """Finite values; with ``normalize`` no all-zero rows.

    ``amax``: :func:`~deltakern.core.dtypes.row_max_abs` of ``t`` when the caller already has it
    (one pass over ``t`` serves the check and the caller's row scaling).

    ``rescales_rows``: the caller multiplies rows by powers of two before normalising them
    (``dk.score`` does, see :mod:`deltakern.core.dtypes`), so with ``normalize`` every finite
    non-zero row is accepted, however tiny or huge. Callers that normalise with a plain sum of
    squares get an error instead of a silently wrong row: a row too small for its squares to
    stay normal in the accumulation dtype, or whose sum of squares overflows. Without
    ``normalize`` the logits are raw dot products, so a row whose sum of squares overflows is
    refused either way.
    """
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    info = torch.finfo(acc)
    # The largest |value| per row is exact (a maximum never underflows), is NaN/inf exactly for
    # a non-finite row, and 0 exactly for an all-zero row: one pass and one host sync decide
    # every common case; norms are computed only for the rare rows near the overflow limit.
    amax = (row_max_abs(t) if amax is None else amax).to(acc)
    tiny_limit = math.sqrt(info.tiny)  # squares of smaller values leave the normal range
    huge_limit = math.sqrt(info.max / t.shape[1])  # below this no sum of squares overflows
    non_finite, zero, tiny, huge = torch.stack([
        ~torch.isfinite(amax).all(), (amax == 0).any(), (amax < tiny_limit).any(), (amax > huge_limit).any()
    ]).tolist()
    if non_finite:
        raise InvalidArgument(f"{name} contains non-finite values (NaN or ±inf)", param=name)
    if normalize and zero:
        row = int(torch.nonzero(amax == 0)[0, 0])
        raise InvalidArgument(
            f"{name} has a zero-norm row (row {row}); rows must be non-zero when normalize=True", param=name
        )
    if normalize and rescales_rows:
        return t
    if huge:
        candidates = torch.nonzero(amax > huge_limit)[:, 0]
        norms = torch.linalg.vector_norm(t[candidates], dim=1, dtype=acc)
        if not bool(torch.isfinite(norms).all()):
            row = int(candidates[int(torch.nonzero(~torch.isfinite(norms))[0, 0])])
            raise InvalidArgument(
                f"{name} has rows whose L2 norm overflows {acc} (row {row}); rescale the rows or pass float64",
                param=name,
            )
    if normalize and tiny:
        row = int(torch.nonzero((amax < tiny_limit) & (amax > 0))[0, 0])
        raise InvalidArgument(
            f"{name} has a row too small to normalise in {acc} (row {row}, largest |value| "
            f"{float(amax[row]):.3g}): its sum of squares underflows; rescale the rows or pass float64",
            param=name,
        )
    return t


def check_embeddings(name: str, t: object, *, normalize: bool) -> torch.Tensor:
    """:func:`check_matrix` then :func:`check_values`."""
    return check_values(name, check_matrix(name, t), normalize=normalize)


def check_inputs(
    X: object,
    W: object,
    *,
    normalize: bool,
    names: tuple[str, str] = ("X", "W"),
    rescales_rows: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a pair of embedding matrices: structure of both, then their agreement, then the
    values (``rescales_rows`` as in :func:`check_values`). ``names`` are the argument names
    used in messages."""
    X = check_matrix(names[0], X)
    W = check_matrix(names[1], W)
    check_pair(X, W, names)
    return (
        check_values(names[0], X, normalize=normalize, rescales_rows=rescales_rows),
        check_values(names[1], W, normalize=normalize, rescales_rows=rescales_rows),
    )


def check_pair(X: torch.Tensor, W: torch.Tensor, names: tuple[str, str] = ("X", "W")) -> None:
    a, b = names
    if X.shape[1] != W.shape[1]:
        raise InvalidArgument(
            f"{a} and {b} must share the embedding dimension: {a}.shape[1]={X.shape[1]}, {b}.shape[1]={W.shape[1]}"
        )
    if X.device != W.device:
        raise InvalidArgument(f"{a} and {b} must be on the same device: {a} on {X.device}, {b} on {W.device}")


def check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentType(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not value > 0 or value != value or value == float("inf"):
        raise InvalidArgument(f"{name} must be a finite number > 0, got {value}")
    return value


def check_finite_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentType(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise InvalidArgument(f"{name} must be finite, got {value}")
    return value


def check_int_range(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentType(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise InvalidArgument(f"{name} must satisfy {low} <= {name} <= {high}, got {value}")
    return value


def check_open_unit(name: str, value: object) -> float:
    value = check_finite_number(name, value)
    if not 0.0 < value < 1.0:
        raise InvalidArgument(f"{name} must lie in the open interval (0, 1), got {value}")
    return value


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise InvalidArgument(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value  # type: ignore[return-value]


def env_switch(variable: str) -> bool:
    """Whether the on/off environment variable ``variable`` is on: unset, empty or ``1`` is on,
    ``0`` off; any other value is an error naming the variable."""
    raw = os.environ.get(variable, "").strip() or "1"
    if raw not in ("0", "1"):
        raise InvalidArgument(f"{variable} must be 0 or 1, got {raw!r}")
    return raw == "1"


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentType(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_labels(labels: object, n: int, k: int, device: torch.device) -> torch.Tensor:
    labels = check_tensor("labels", labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise InvalidArgumentType(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.shape != (n,):
        raise InvalidArgument(f"labels must have shape ({n},) to match X, got {tuple(labels.shape)}")
    if labels.device != device:
        raise InvalidArgument(f"labels must be on X's device {device}, got {labels.device}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= k:
        bad = low if low < 0 else high
        raise InvalidArgument(f"labels must lie in [0, K) = [0, {k}), got a label {bad}")
    return labels.long()


def check_classnames(classnames: object, name: str = "classnames") -> list[str]:
    """A non-empty sequence of non-empty strings (not a single string); returned as a list."""
    if isinstance(classnames, str) or not isinstance(classnames, Sequence):
        raise InvalidArgumentType(f"{name} must be a sequence of strings, got {type(classnames).__name__}")
    names = list(classnames)
    if not names:
        raise InvalidArgument(f"{name} must contain at least one class name, got an empty sequence")
    for i, entry in enumerate(names):
        if not isinstance(entry, str) or not entry.strip():
            raise InvalidArgument(f"{name}[{i}] must be a non-empty string, got {entry!r}")
    return names


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
