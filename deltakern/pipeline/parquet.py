"""The parquet output of ``deltakern score``: its schema, one shard's table, the merge of the parts."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deltakern.core.errors import InvalidArgument
from deltakern.data.atomic import atomic_path


def scores_schema(c: int, *, neglabel: bool = False):
    """The parquet schema of ``deltakern score`` output for top-``c`` indices (with a
    ``neglabel`` column when the run used negative labels)."""
    import pyarrow as pa

    extra = [("neglabel", pa.float32())] if neglabel else []
    return pa.schema(
        [
            ("id", pa.string()),
            ("source", pa.string()),
            ("pred", pa.int64()),
            ("pred_name", pa.string()),
            ("delta_energy", pa.float32()),
            ("energy", pa.float32()),
            ("msp", pa.float32()),
            ("max_logit", pa.float32()),
            ("topk_indices", pa.list_(pa.int64(), c)),
            *extra,
        ]
    )


def scores_table(
    ids: Sequence[str], sources: Sequence[str], result: Any, names: Sequence[str], c: int, *, neglabel: bool = False
):
    """One shard's rows as a pyarrow table (``result`` is a :class:`deltakern.Scores` or None)."""
    import numpy as np
    import pyarrow as pa

    schema = scores_schema(c, neglabel=neglabel)
    if result is None:
        return schema.empty_table()
    host = {k: v.cpu().numpy() for k, v in result.as_dict().items()}
    pred = host["pred"].astype(np.int64)
    topk = pa.FixedSizeListArray.from_arrays(pa.array(host["topk_indices"].reshape(-1).astype(np.int64)), c)
    columns = [
        pa.array(list(ids), pa.string()),
        pa.array(list(sources), pa.string()),
        pa.array(pred),
        pa.array([names[k] for k in pred], pa.string()),
        *(pa.array(host[k].astype(np.float32)) for k in ("delta_energy", "energy", "msp", "max_logit")),
        topk,
        *([pa.array(host["neglabel"].astype(np.float32))] if neglabel else []),
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def write_parquet_atomic(table: Any, path: Path) -> None:
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def merge_parts(parts: Sequence[Path], out: Path, schema: Any) -> None:
    """Concatenate parquet parts in order into ``out`` (atomically), one part in memory at a time."""
    import pyarrow.parquet as pq

    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for part in parts:
            writer.write_table(pq.read_table(part, schema=schema))


def output_paths(out: str | os.PathLike) -> tuple[Path, Path, Path]:
    """``(parquet, manifest, parts directory)`` of a score run: ``x.parquet``,
    ``x.manifest.json`` and ``x.parts/``."""
    out = Path(out)
    if out.suffix != ".parquet":
        raise InvalidArgument(f"out must be a path ending in .parquet, got {str(out)!r}", param="out")
    return out, out.with_suffix(".manifest.json"), out.with_suffix(".parts")
