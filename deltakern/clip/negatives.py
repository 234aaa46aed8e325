"""Negative-label mining (NegMining of NegLabel, Jiang et al., ICLR 2024).

From a user-supplied vocabulary (one word or phrase per line), keep the ``m`` candidates farthest
from the in-distribution labels: each candidate's text embedding is compared with every ID class
embedding, the ``percentile`` (default 0.95) of those cosine similarities is its closeness to
the ID set, and the ``m`` candidates with the lowest closeness are selected (docs/conventions.md
§2.5). Candidates are embedded with the same text encoder and templates as the ID classes.
Mining is deterministic (ties in closeness go to the earlier vocabulary line) and cached on disk
like the class embeddings, keyed by model, weights, vocabulary, ID class names, templates, ``m``
and ``percentile``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from deltakern.clip.zeroshot import (
    Template,
    autocast_field,
    build_class_embeddings,
    cached_class_embeddings,
    classnames_hash,
    default_cache_dir,
    templates_hash,
)
from deltakern.core.errors import InvalidArgument
from deltakern.core.validation import check_classnames, check_int_range, check_open_unit
from deltakern.data.atomic import atomic_path
from deltakern.data.text import read_lines

MINING_VERSION = 1
DEFAULT_PERCENTILE = 0.95


@dataclass(frozen=True)
class NegativeLabels:
    """Mined negative labels: their names and unit-norm text embeddings ``[m, D]`` (float32),
    ordered from the farthest from the ID labels to the nearest selected one."""

    names: list[str]
    embeddings: torch.Tensor
    closeness: torch.Tensor  # [m] float64: the percentile similarity to the ID labels


def read_vocabulary(path: str | os.PathLike, exclude: Sequence[str] = ()) -> list[str]:
    """Unique candidate labels of a vocabulary file in file order, without the ``exclude`` names
    (compared case-insensitively: an ID class is never its own negative)."""
    excluded = {name.strip().lower() for name in exclude}
    seen: set[str] = set()
    words = []
    for word in read_lines(path, name="negative_labels"):
        key = word.lower()
        if key in seen or key in excluded:
            continue
        seen.add(key)
        words.append(word)
    return words


def select_negatives(candidates: torch.Tensor, id_embeddings: torch.Tensor, m: int, percentile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices [m], closeness [m])`` of the ``m`` candidate rows farthest from the ID rows.

    Closeness is the ``percentile`` quantile (linear interpolation) of a candidate's cosine
    similarities to the ID rows, in float64; a stable sort keeps the earlier candidate first
    among equals.
    """
    c = torch.nn.functional.normalize(candidates.to(torch.float64), dim=1)
    w = torch.nn.functional.normalize(id_embeddings.to(torch.float64), dim=1)
    closeness = torch.empty(c.shape[0], dtype=torch.float64, device=c.device)
    step = max(1, (1 << 22) // max(w.shape[0], 1))  # bounded memory for large vocabularies
    for start in range(0, c.shape[0], step):
        closeness[start:start + step] = torch.quantile(c[start:start + step] @ w.T, percentile, dim=1)
    order = torch.sort(closeness, stable=True).indices[:m]
    return order, closeness[order]


def mining_key(model_name: str, weights: str, vocabulary: Sequence[str], id_classnames: Sequence[str],
               templates: Sequence[Template], m: int, percentile: float, autocast_dtype: torch.dtype | None = None) -> dict:
    """The identity of a mined negative set (what its cache entry is keyed by); the autocast
    dtype of the text tower is part of it as in the class-embedding cache."""
    return {
        **autocast_field(autocast_dtype),
        "version": MINING_VERSION,
        "model": model_name,
        "weights": weights,
        "vocabulary_sha256": hashlib.sha256(json.dumps(list(vocabulary)).encode("utf-8")).hexdigest(),
        "classnames_sha256": classnames_hash(id_classnames),
        "templates_sha256": templates_hash(templates),
        "m": m,
        "percentile": percentile,
    }


def _mining_entry(
    model_name: str,
    pretrained: str,
    id_classnames: Sequence[str],
    vocabulary: str | os.PathLike | Sequence[str],
    m: int,
    templates: Sequence[Template],
    *,
    percentile: float,
    cache_dir: str | os.PathLike | None,
    seed: int,
    autocast_dtype: torch.dtype | None,
) -> tuple[list[str], list[str], dict, Path]:
    """Checked ``(id_classnames, usable words, cache key, cache path)`` of one mining."""
    from deltakern.clip.models import NO_WEIGHTS, weights_identity

    id_classnames = check_classnames(id_classnames, "id_classnames")
    words = read_vocabulary(vocabulary, id_classnames) if isinstance(vocabulary, (str, os.PathLike)) else [
        w for w in dict.fromkeys(check_classnames(vocabulary, "vocabulary")) if w.lower() not in {c.lower() for c in id_classnames}
    ]
    m = check_int_range("n_negative", m, 1, 1 << 30)
    if m > len(words):
        raise InvalidArgument(
            f"n_negative={m} exceeds the {len(words)} usable vocabulary entries (after removing duplicates and ID class names)",
            param="n_negative",
        )
    percentile = check_open_unit("percentile", percentile)
    weights = weights_identity(pretrained)
    if weights == NO_WEIGHTS:
        weights = f"{NO_WEIGHTS}:seed={seed}"
    key = mining_key(model_name, weights, words, id_classnames, templates, m, percentile, autocast_dtype)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:32]
    path = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / f"negatives-{digest}.safetensors"
    return id_classnames, words, key, path


def _read_entry(path: Path, device: torch.device | str) -> NegativeLabels | None:
    """The mined labels stored at ``path``, or None when nothing is stored there."""
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    stored = load_file(str(path))
    with open(path.with_suffix(".json"), encoding="utf-8") as f:
        names = json.load(f)["names"]
    return NegativeLabels(names, stored["embeddings"].to(device), stored["closeness"].to(device))


def find_mined_negative_labels(
    model_name: str,
    pretrained: str,
    id_classnames: Sequence[str],
    vocabulary: str | os.PathLike | Sequence[str],
    m: int,
    templates: Sequence[Template],
    *,
    percentile: float = DEFAULT_PERCENTILE,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> NegativeLabels | None:
    """What :func:`mine_negative_labels` would return for the model ``model_name`` with weights
    ``pretrained`` when it has already mined it (read from the cache), or None, without creating
    the model: a caller with a cache hit never pays for loading the text encoder."""
    *_, path = _mining_entry(model_name, pretrained, id_classnames, vocabulary, m, templates,
                             percentile=percentile, cache_dir=cache_dir, seed=seed, autocast_dtype=autocast_dtype)  # fmt: skip
    return _read_entry(path, device)


def mine_negative_labels(
    clip: "ClipModel",  # noqa: F821 - deltakern.clip.models.ClipModel
    id_classnames: Sequence[str],
    vocabulary: str | os.PathLike | Sequence[str],
    m: int,
    templates: Sequence[Template],
    *,
    percentile: float = DEFAULT_PERCENTILE,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> NegativeLabels:
    """Mine ``m`` negative labels for ``id_classnames`` from ``vocabulary`` (a file or a list).

    ``templates`` are those of the ID class embeddings. Results are cached under ``cache_dir``
    (default: the class-embedding cache); a changed vocabulary, class list, template set, model,
    ``m`` or ``percentile`` is a different entry (:func:`find_mined_negative_labels` reads one
    without the model).
    """
    from safetensors.torch import save_file

    id_classnames, words, key, path = _mining_entry(
        clip.name, clip.pretrained, id_classnames, vocabulary, m, templates,
        percentile=percentile, cache_dir=cache_dir, seed=seed, autocast_dtype=autocast_dtype,
    )  # fmt: skip
    m, percentile = key["m"], key["percentile"]  # as checked
    cached = _read_entry(path, clip.device)
    if cached is not None:
        return cached

    W_id = cached_class_embeddings(clip, id_classnames, templates, cache_dir=cache_dir, seed=seed, autocast_dtype=autocast_dtype)
    candidates = build_class_embeddings(clip.model, clip.tokenizer, words, templates, device=clip.device, autocast_dtype=autocast_dtype)
    index, closeness = select_negatives(candidates, W_id, m, percentile)
    result = NegativeLabels([words[i] for i in index.tolist()], candidates[index].contiguous(), closeness)
    # Names first, then the tensors: an entry counts as cached only once its tensor file exists.
    with atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps({"key": key, "names": result.names}, indent=1) + "\n", encoding="utf-8")
    with atomic_path(path) as tmp:
        save_file({"embeddings": result.embeddings.cpu(), "closeness": closeness.cpu()}, str(tmp),
                  metadata={"key": json.dumps(key, sort_keys=True)})
    return result
