"""Loading cached embeddings and labels from ``.npy``, ``.npz``, ``.pt``/``.pth`` and
``.safetensors`` files, with errors that name the file and what was wrong.

A file holding several arrays (``.npz``, a ``.pt`` dict, ``.safetensors``) needs a key unless it
holds exactly one array; on the command line the key follows the path: ``feats.safetensors:image``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from deltakern.core.errors import InputNotFound, InvalidArgument, InvalidArgumentType

SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".safetensors")


def split_key(spec: str | os.PathLike) -> tuple[Path, str | None]:
    """``"file.pt:key"`` -> ``(Path("file.pt"), "key")``; a path that exists as given has no key."""
    text = os.fspath(spec)
    path = Path(text)
    if path.exists() or ":" not in text:
        return path, None
    head, key = text.rsplit(":", 1)
    if key and Path(head).exists():
        return Path(head), key
    return path, None


def file_sha256(path: str | os.PathLike, block: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pick(name: str, path: Path, arrays: dict, key: str | None):
    if key is not None:
        if key not in arrays:
            raise InvalidArgument(f"{name}: {path} has no array named {key!r}; it holds {sorted(arrays)}")
        return arrays[key]
    if len(arrays) != 1:
        raise InvalidArgument(
            f"{name}: {path} holds {len(arrays)} arrays {sorted(arrays)}; choose one with {path}:KEY"
        )
    return next(iter(arrays.values()))


def _from_numpy(name: str, path: Path, arr) -> torch.Tensor:
    arr = np.asarray(arr)
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise InvalidArgumentType(f"{name}: {path} must hold a numeric array, got dtype {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def load_array(spec: str | os.PathLike, *, name: str = "input") -> torch.Tensor:
    """Load one array (as a CPU tensor) from ``spec`` = ``PATH`` or ``PATH:KEY``.

    ``name`` is the flag or argument the path came from; it leads every error message.
    """
    path, key = split_key(spec)
    if not path.is_file():
        raise InputNotFound(f"{name}: no such file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if key is not None:
            raise InvalidArgument(f"{name}: {path} is a single .npy array; it takes no key (got {key!r})")
        return _from_numpy(name, path, np.load(path, allow_pickle=False))
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            return _from_numpy(name, path, _pick(name, path, {k: npz[k] for k in npz.files}, key))
    if suffix in (".pt", ".pth"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            obj = _pick(name, path, tensors, key)
        elif key is not None:
            raise InvalidArgument(f"{name}: {path} holds a single tensor; it takes no key (got {key!r})")
        if not isinstance(obj, torch.Tensor):
            raise InvalidArgumentType(f"{name}: {path} must hold a tensor or a dict of tensors, got {type(obj).__name__}")
        return obj
    if suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:  # an optional dependency (the "clip" extra)
            raise InvalidArgument(f"{name}: reading {path} needs the safetensors package (pip install safetensors)") from exc
        return _pick(name, path, load_file(str(path), device="cpu"), key)
    raise InvalidArgument(f"{name}: {path} has an unsupported suffix {suffix!r}; expected one of {', '.join(SUFFIXES)}")


def load_embeddings(spec: str | os.PathLike, *, name: str = "embeddings", dim: int | None = None) -> torch.Tensor:
    """A floating ``[N, D]`` matrix (float16/bfloat16/float32/float64 are kept as stored)."""
    t = load_array(spec, name=name)
    if not t.is_floating_point():
        raise InvalidArgumentType(f"{name}: {spec} must hold floating-point embeddings, got dtype {t.dtype}")
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise InvalidArgument(f"{name}: {spec} must hold a non-empty [N, D] matrix, got shape {tuple(t.shape)}")
    if dim is not None and t.shape[1] != dim:
        raise InvalidArgument(f"{name}: {spec} must have D = {dim} columns to match the classes, got shape {tuple(t.shape)}")
    return t


def load_labels(spec: str | os.PathLike, *, name: str = "labels", n: int | None = None) -> torch.Tensor:
    """An int64 vector ``[N]`` of class indices (``n`` checks the length)."""
    t = load_array(spec, name=name)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise InvalidArgumentType(f"{name}: {spec} must hold integer class indices, got dtype {t.dtype}")
    if t.dim() != 1:
        raise InvalidArgument(f"{name}: {spec} must hold a 1-D vector, got shape {tuple(t.shape)}")
    if n is not None and t.shape[0] != n:
        raise InvalidArgument(f"{name}: {spec} must hold {n} labels (one per ID row), got {t.shape[0]}")
    return t.to(torch.int64)
