"""``deltakern filter``: keep the rows of scored parquet files that a threshold accepts.

Streams record batches with pyarrow (``ParquetFile.iter_batches``), so memory is bounded by
one batch (and one row group of the input) whatever the number of rows; every output is
written through a temporary file renamed into place when the run succeeds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltakern.core.errors import InputNotFound, InvalidArgument

EXAMPLE = """\
examples:
  deltakern filter scores.parquet --threshold T.json --out kept.parquet
  deltakern filter scores.parts --threshold T.json --out kept.parquet \\
      --rejected rejected.parquet --list kept.txt

SCORES is the parquet file of `deltakern score` (x.parquet) or its folder of parts (x.parts/);
the manifest beside it (x.manifest.json) says how the scores were made, and a threshold fitted
for other settings (score, c, temperature, reset, mode, model, class set) is refused. A row is
kept when its score >= the threshold's value.
"""


@dataclass(frozen=True)
class ScoredFiles:
    """A scored parquet file or folder of parts: its manifest and its parquet files in order."""

    path: Path
    manifest_path: Path
    manifest: dict[str, Any]
    files: tuple[Path, ...]


def _manifest_for(path: Path) -> Path:
    """``x.manifest.json`` beside ``x.parquet`` or ``x.parts/``; for another folder, the one
    ``*.manifest.json`` inside it."""
    beside = path.with_suffix(".manifest.json")
    if beside.is_file():
        return beside
    if path.is_dir():
        inside = sorted(path.glob("*.manifest.json"))
        if len(inside) == 1:
            return inside[0]
    raise InputNotFound(
        f"no manifest for {str(path)!r}: expected {str(beside)!r} (written by `deltakern score` beside its output)",
        param="scores",
    )


def open_scored(path: str | os.PathLike, param: str = "scores") -> ScoredFiles:
    """Resolve a scored parquet file or folder of parquet parts, with its manifest."""
    path = Path(path)
    if path.is_dir():
        files = tuple(sorted(p for p in path.glob("*.parquet") if not p.name.startswith(".")))
        if not files:
            raise InvalidArgument(f"{param} folder {str(path)!r} holds no .parquet files", param=param)
    elif path.is_file():
        files = (path,)
    else:
        raise InputNotFound(f"{param} {str(path)!r} does not exist", param=param)
    manifest_path = _manifest_for(path)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"manifest {str(manifest_path)!r} is not JSON: {exc}", param=param) from exc
    return ScoredFiles(path=path, manifest_path=manifest_path, manifest=manifest, files=files)


def identity_of(scored: ScoredFiles, score: str, param: str = "scores"):
    """The :class:`~deltakern.ood.threshold.ScoreIdentity` of column ``score`` of ``scored``."""
    from deltakern.ood.threshold import ScoreIdentity

    try:
        return ScoreIdentity.from_manifest(scored.manifest, score)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{scored.manifest_path}: {exc}", param=param) from exc


def iter_batches(files: tuple[Path, ...], batch_rows: int, columns: list[str] | None = None):
    """Record batches of every file in order, at most ``batch_rows`` rows each."""
    import pyarrow.parquet as pq

    for f in files:
        # pre_buffer=False: read one row group's column chunks at a time instead of coalescing
        # reads ahead (which holds more of the file in memory for no gain on local disks).
        with pq.ParquetFile(f, pre_buffer=False) as pf:
            yield from pf.iter_batches(batch_size=batch_rows, columns=columns)


def read_scores(scored: ScoredFiles, score: str, batch_rows: int = 1 << 20):
    """Column ``score`` of every row as one float numpy array (the only column read)."""
    import numpy as np
    import pyarrow.parquet as pq

    chunks = []
    for f in scored.files:
        if score not in pq.read_schema(f).names:
            raise InvalidArgument(f"{str(f)!r} has no {score!r} column", param="score")
    for batch in iter_batches(scored.files, batch_rows, [score]):
        column = batch.column(0)
        if column.null_count:
            raise InvalidArgument(f"{scored.path}: column {score!r} has missing values", param="scores")
        chunks.append(column.to_numpy(zero_copy_only=False))
    return np.concatenate(chunks) if chunks else np.empty(0, dtype=np.float32)


def _manifest_of_output(scored: ScoredFiles, out: Path, rows: int, selection: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a filter output: the source's settings, so the output can be scored
    against a threshold or calibrated again."""
    src = scored.manifest
    return {
        "kind": "deltakern-scores",
        "version": src.get("version"),
        "output": out.name,
        "args": src["args"],
        "model": src.get("model"),
        "classes": src.get("classes"),
        "rows": rows,
        "filtered_from": {"scores": str(scored.path), "manifest": str(scored.manifest_path), **selection},
    }


def filter_scores(
    scores: str | os.PathLike,
    threshold: Any,
    out: str | os.PathLike,
    *,
    rejected: str | os.PathLike | None = None,
    kept_list: str | os.PathLike | None = None,
    batch_rows: int = 65_536,
) -> dict[str, int]:
    """Write the rows of ``scores`` whose ``threshold.identity.score`` column is ``>=``
    ``threshold.value`` to ``out`` (and the others to ``rejected``, the kept rows' ``source``
    paths to ``kept_list``, one per line), streaming ``batch_rows`` rows at a time.

    Refuses a threshold fitted for other settings than the manifest's. Returns exact counts
    ``{"rows", "kept", "rejected"}``. Outputs appear only when every row was written.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from deltakern.core.validation import check_int_range
    from deltakern.data.atomic import atomic_path, write_json

    batch_rows = check_int_range("batch_rows", batch_rows, 1, 1 << 30)
    scored = open_scored(scores)
    score = threshold.identity.score
    threshold.check(identity_of(scored, score))
    outputs = [Path(p) for p in (out, rejected, kept_list) if p is not None]
    inputs = {f.resolve() for f in scored.files} | {scored.manifest_path.resolve()}
    for p in outputs:
        if p.resolve() in inputs or p.with_suffix(".manifest.json").resolve() in inputs:
            raise InvalidArgument(f"output {str(p)!r} would overwrite the input {str(scored.path)!r}", param="out")
    if len({p.resolve() for p in outputs}) != len(outputs):
        raise InvalidArgument("out, rejected and list must be different files", param="out")

    schema = pq.read_schema(scored.files[0])
    for f in scored.files[1:]:
        if not pq.read_schema(f).equals(schema):
            raise InvalidArgument(f"{str(f)!r} has another schema than {str(scored.files[0])!r}", param="scores")
    if score not in schema.names:
        raise InvalidArgument(f"{str(scored.path)!r} has no {score!r} column", param="scores")
    if kept_list is not None and "source" not in schema.names:
        raise InvalidArgument(f"{str(scored.path)!r} has no 'source' column for the list", param="kept_list")
    # float64 holds every float32 score exactly, so the comparison is exact.
    value = pa.scalar(threshold.value, pa.float64())
    counts = {"rows": 0, "kept": 0, "rejected": 0}
    # Dictionary-encode only the low-cardinality columns: trying it on ids and paths (unique per
    # row) costs time and then falls back to plain encoding anyway.
    writer_options = {"use_dictionary": [c for c in ("pred", "pred_name") if c in schema.names] or False}
    with contextlib.ExitStack() as stack:
        kept_writer = pq.ParquetWriter(stack.enter_context(atomic_path(out)), schema, **writer_options)
        stack.callback(kept_writer.close)
        rejected_writer = None
        if rejected is not None:
            rejected_writer = pq.ParquetWriter(stack.enter_context(atomic_path(rejected)), schema, **writer_options)
            stack.callback(rejected_writer.close)
        list_file = None
        if kept_list is not None:
            list_file = stack.enter_context(open(stack.enter_context(atomic_path(kept_list)), "w", encoding="utf-8"))
        for batch in iter_batches(scored.files, batch_rows):
            column = batch.column(score)
            # NaN >= t is false; a missing score is never kept either.
            mask = pc.fill_null(pc.greater_equal(pc.cast(column, pa.float64()), value), False)
            kept = batch.filter(mask)
            counts["rows"] += batch.num_rows
            counts["kept"] += kept.num_rows
            kept_writer.write_batch(kept)
            if rejected_writer is not None:
                rejected_writer.write_batch(batch.filter(pc.invert(mask)))
            if list_file is not None and kept.num_rows:
                paths = kept.column("source").to_pylist()
                if any(p is None or "\n" in p for p in paths):
                    raise InvalidArgument("a kept row's source is missing or holds a newline; it cannot be listed", param="kept_list")
                list_file.write("\n".join(paths) + "\n")
        counts["rejected"] = counts["rows"] - counts["kept"]
        # Leaving the stack closes each writer (its footer written) before its temporary file
        # is renamed into place; an error removes every temporary file instead.
    selection = {"score": score, "threshold": threshold.value, "counts": counts}
    for path, rows, which in ((out, counts["kept"], "kept"), (rejected, counts["rejected"], "rejected")):
        if path is not None and Path(path).suffix == ".parquet":
            write_json(Path(path).with_suffix(".manifest.json"), _manifest_of_output(scored, Path(path), rows, {**selection, "rows": which}), indent=2)
    return counts


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "filter",
        help="keep the rows of a scored parquet that a threshold accepts (streams any size)",
        description="Apply a threshold of `deltakern calibrate` to the scores of `deltakern score`: "
        "rows whose score >= the threshold go to OUT, the others to --rejected. Streams the "
        "parquet in batches (bounded memory, any number of rows), prints exact counts, and "
        "writes every output atomically (with a manifest beside each parquet output).",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("scores", metavar="SCORES", help="scored parquet file (x.parquet) or folder of parts (x.parts/)")
    p.add_argument("--threshold", required=True, metavar="T.json", help="threshold file written by `deltakern calibrate`")
    p.add_argument("--out", required=True, metavar="KEPT.parquet", help="parquet file for the kept rows")
    p.add_argument("--rejected", metavar="REJECTED.parquet", help="parquet file for the rejected rows")
    p.add_argument("--list", dest="kept_list", metavar="KEPT.txt",
                   help="text file with the kept rows' source paths, one per line (a file list for --images)")
    p.add_argument("--batch-rows", type=int, default=65_536, help="rows per streamed batch (default 65536)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deltakern.ood.threshold import load_threshold

    threshold = load_threshold(args.threshold)
    counts = filter_scores(
        args.scores, threshold, args.out, rejected=args.rejected, kept_list=args.kept_list, batch_rows=args.batch_rows
    )
    n = counts["rows"]
    share = f" ({100.0 * counts['kept'] / n:.2f}%)" if n else ""
    print(
        f"kept {counts['kept']} of {n} rows{share}, rejected {counts['rejected']}: "
        f"{threshold.identity.score} >= {threshold.value!r}; kept rows in {args.out}"
        + (f", rejected rows in {args.rejected}" if args.rejected else "")
        + (f", kept sources in {args.kept_list}" if args.kept_list else "")
    )
    return 0
