"""Embedding feature shards: safetensors files of L2-normalised embeddings with the ids and
sources of their rows (what ``deltakern encode`` writes and ``deltakern score --features`` reads)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltakern.core.errors import InvalidArgument
from deltakern.data.atomic import atomic_path
from deltakern.data.rundir import read_json

FEATURE_KEY = "embeddings"


def write_feature_shard(path: str | os.PathLike, embeddings: torch.Tensor, ids: Sequence[str], sources: Sequence[str]) -> None:
    """Write one feature shard atomically: a safetensors file holding ``embeddings [n, D]``
    with the ids and sources of its rows in the header metadata."""
    from safetensors.torch import save_file

    if embeddings.shape[0] != len(ids) or len(ids) != len(sources):
        raise InvalidArgument(f"embeddings has {embeddings.shape[0]} rows but {len(ids)} ids and {len(sources)} sources")
    with atomic_path(path) as tmp:
        save_file(
            {FEATURE_KEY: embeddings.detach().cpu().contiguous()},
            str(tmp),
            metadata={"ids": json.dumps(list(ids)), "sources": json.dumps(list(sources))},
        )


def read_feature_shard(path: str | os.PathLike) -> tuple[torch.Tensor, list[str], list[str]]:
    """``(embeddings [n, D], ids, sources)`` of a feature shard written by :func:`write_feature_shard`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        embeddings = f.get_tensor(FEATURE_KEY)
    return embeddings, json.loads(meta.get("ids", "[]")), json.loads(meta.get("sources", "[]"))


@dataclass
class FeatureShard:
    """A feature shard of an encode run, as a unit of scoring work."""

    index: int
    path: Path


def open_features(directory: str | os.PathLike) -> tuple[dict[str, Any], list[FeatureShard]]:
    """The manifest and shards of a finished :func:`deltakern.pipeline.run_encode` output directory."""
    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise InvalidArgument(
            f"features must be a directory written by `deltakern encode` (with manifest.json), "
            f"got {str(directory)!r} ({'no manifest.json: is the encode run finished?' if directory.is_dir() else 'not a directory'})",
            param="features",
        )
    manifest = read_json(manifest_path)
    if manifest.get("kind") != "deltakern-features":
        raise InvalidArgument(f"features: {manifest_path} is not a deltakern features manifest", param="features")
    return manifest, [FeatureShard(index=s["index"], path=directory / s["file"]) for s in manifest["shards"]]
