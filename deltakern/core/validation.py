"""Input checks shared by every public entry point (docs/conventions.md §8).

Each check raises ``ValueError`` (or ``TypeError`` for a wrong type) with a message that names
the argument, what was expected and what was received. Checks never modify their inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

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


def check_values(name: str, t: torch.Tensor, *, normalize: bool) -> torch.Tensor:
    """Finite values; with ``normalize`` no zero-norm rows."""
    # One pass over the rows: a row norm is finite exactly when the row is finite (or its norm
    # overflows, told apart below), and it also finds zero rows. One host sync per call.
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    norms = torch.linalg.vector_norm(t, dim=1, dtype=acc)
    if not bool(torch.isfinite(norms).all()):
        if not bool(torch.isfinite(t).all()):
            raise InvalidArgument(f"{name} contains non-finite values (NaN or ±inf)")
        raise InvalidArgument(
            f"{name} has rows whose L2 norm overflows {acc}; rescale the rows or pass float64"
        )
    if normalize:
        zero = norms == 0
        if bool(zero.any()):
            row = int(torch.nonzero(zero)[0, 0])
            raise InvalidArgument(
                f"{name} has a zero-norm row (row {row}); rows must be non-zero when normalize=True"
            )
    return t


def check_embeddings(name: str, t: object, *, normalize: bool) -> torch.Tensor:
    """:func:`check_matrix` then :func:`check_values`."""
    return check_values(name, check_matrix(name, t), normalize=normalize)


def check_inputs(
    X: object, W: object, *, normalize: bool, names: tuple[str, str] = ("X", "W")
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a pair of embedding matrices: structure of both, then their agreement, then the
    values. ``names`` are the argument names used in messages."""
    X = check_matrix(names[0], X)
    W = check_matrix(names[1], W)
    check_pair(X, W, names)
    return check_values(names[0], X, normalize=normalize), check_values(names[1], W, normalize=normalize)


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
