"""Scored parquet outputs written without a model: the layout of `deltakern score` (x.parquet,
x.parts/part-*.parquet, x.manifest.json) with synthetic score columns."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deltakern.clip.zeroshot import classnames_hash
from deltakern.data.atomic import write_json
from deltakern.pipeline.parquet import merge_parts, output_paths, scores_schema, write_parquet_atomic

CLASSES = ["cat", "dog", "bird", "fish"]


def score_args(**overrides) -> dict:
    """The manifest ``args`` of a score run (the keys `deltakern score` writes)."""
    args = {
        "task": "score", "model": "ViT-B-32", "pretrained": "openai", "seed": 0, "images": "imgs",
        "classnames_sha256": classnames_hash(CLASSES), "templates_sha256": "t" * 64,
        "c": 1, "temperature": 0.01, "reset": 0.0, "mode": "separate", "backend": "cpp",
        "precision": "fp32", "device": "cpu",
    }  # fmt: skip
    args.update(overrides)
    return args


def write_scored(out: Path, n: int, *, seed: int = 0, shift: float = 0.0, parts: int = 3, ties: float = 0.25, **args) -> Path:
    """Write ``n`` synthetic rows as a score run's output at ``out`` (x.parquet) in ``parts``
    parts; scores are normal draws (+ ``shift``) rounded to multiples of ``ties`` so that equal
    scores occur. Returns ``out``."""
    import pyarrow as pa

    out, manifest_path, parts_dir = output_paths(out)
    a = score_args(**args)
    c = a["c"]
    rng = np.random.default_rng(seed)
    de = (np.round((rng.normal(size=n) + shift) / ties) * ties).astype(np.float32)
    schema = scores_schema(c)
    bounds = np.linspace(0, n, parts + 1).astype(int)
    files = []
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        rows = hi - lo
        pred = rng.integers(0, len(CLASSES), size=rows)
        topk = pa.FixedSizeListArray.from_arrays(pa.array(rng.integers(0, len(CLASSES), size=rows * c)), c)
        table = pa.Table.from_arrays(
            [
                pa.array([f"img{j:07d}.jpg" for j in range(lo, hi)], pa.string()),
                pa.array([f"/data/{out.stem}/img{j:07d}.jpg" for j in range(lo, hi)], pa.string()),
                pa.array(pred, pa.int64()),
                pa.array([CLASSES[k] for k in pred], pa.string()),
                pa.array(de[lo:hi]),
                pa.array((de[lo:hi] + 20).astype(np.float32)),
                pa.array(rng.uniform(size=rows).astype(np.float32)),
                pa.array((de[lo:hi] + 25).astype(np.float32)),
                topk,
            ],
            schema=schema,
        )
        files.append(parts_dir / f"part-{i:05d}.parquet")
        write_parquet_atomic(table, files[-1])
    merge_parts(files, out, schema)
    manifest = {
        "kind": "deltakern-scores", "version": 1, "output": out.name, "args": a,
        "model": {"model": a["model"], "pretrained": a["pretrained"]},
        "classes": {"count": len(CLASSES), "names": CLASSES}, "rows": n,
    }  # fmt: skip
    write_json(manifest_path, manifest)
    return out
