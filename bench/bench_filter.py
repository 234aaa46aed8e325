"""``deltakern filter`` on a 10-million-row scored parquet: rows/s and peak memory.

The input has the schema of ``deltakern score`` (id, source, pred, pred_name, four float32
scores, top-1 indices) with synthetic values, written like the merged output of a score run
with 10,000-image shards (row groups of 10,000 rows). It is written once under ``--work`` and
reused. Each measured run is a fresh child process (``python -c``) so that its peak resident
set size (``resource.getrusage(...).ru_maxrss``) belongs to that run alone; the child reports
its resident size after its imports as well, so the peak *extra* memory of the filter is known.
For scale, the same child also runs the in-memory way (``pq.read_table`` + ``Table.filter``)
side by side.

    python bench/bench_filter.py [--rows 10000000] [--repeats 3] [--work /tmp/dk_bench_filter] [--out out/bench]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import pyarrow as pa, pyarrow.compute as pc, pyarrow.parquet as pq
from deltakern.cli.commands.filter import filter_scores
from deltakern.ood.threshold import load_threshold

def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
mode, scores, threshold, out, batch = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
t = load_threshold(threshold)
base = rss_mb()
start = time.perf_counter()
if mode == "stream":
    counts = filter_scores(scores, t, out, rejected=out + ".rejected.parquet", batch_rows=batch)
else:  # the in-memory way: read everything, filter, write
    table = pq.read_table(scores)
    mask = pc.greater_equal(table.column(t.identity.score), t.value)
    pq.write_table(table.filter(mask), out)
    pq.write_table(table.filter(pc.invert(mask)), out + ".rejected.parquet")
    counts = {"rows": table.num_rows, "kept": int(pc.sum(mask).as_py())}
wall = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"wall_s": wall, "peak_rss_mb": peak, "base_rss_mb": base, **counts}))
"""


def make_input(path: Path, rows: int, row_group: int = 10_000, chunk: int = 1_000_000) -> None:
    """A scored parquet of ``rows`` synthetic rows and its manifest (skipped when present)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from deltakern.data.atomic import atomic_path, write_json
    from deltakern.pipeline.parquet import scores_schema

    manifest = path.with_suffix(".manifest.json")
    if path.is_file() and manifest.is_file() and json.loads(manifest.read_text()).get("rows") == rows:
        return
    schema = scores_schema(1)
    rng = np.random.default_rng(0)
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for lo in range(0, rows, chunk):
            n = min(chunk, rows - lo)
            de = rng.normal(size=n).astype(np.float32)
            pred = rng.integers(0, 1000, size=n)
            ids = [f"{j:09d}.jpg" for j in range(lo, lo + n)]
            table = pa.Table.from_arrays(
                [
                    pa.array(ids, pa.string()),
                    pa.array(["/data/imagenet/train/" + i for i in ids], pa.string()),
                    pa.array(pred, pa.int64()),
                    pa.array([f"class_{k}" for k in pred], pa.string()),
                    pa.array(de),
                    pa.array(de + 20),
                    pa.array(rng.uniform(size=n).astype(np.float32)),
                    pa.array(de + 25),
                    pa.FixedSizeListArray.from_arrays(pa.array(pred), 1),
                ],
                schema=schema,
            )
            writer.write_table(table, row_group_size=row_group)
    args = {"task": "score", "model": "ViT-B-32", "pretrained": "openai", "classnames_sha256": "0" * 64,
            "templates_sha256": "1" * 64, "c": 1, "temperature": 0.01, "reset": 0.0, "mode": "separate"}  # fmt: skip
    write_json(manifest, {"kind": "deltakern-scores", "version": 1, "output": path.name, "args": args, "rows": rows})


def run_child(mode: str, scores: Path, threshold: Path, out: Path, batch: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(scores), str(threshold), str(out), str(batch)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-rows", type=int, default=65_536)
    ap.add_argument("--work", default="/tmp/dk_bench_filter", help="where the input and outputs are written")
    ap.add_argument("--out", default="out/bench", help="directory of filter.json")
    ap.add_argument("--skip-in-memory", action="store_true", help="do not run the read_table comparison")
    args = ap.parse_args()

    from deltakern.bench.harness import environment
    from deltakern.data.atomic import write_json
    from deltakern.ood.threshold import ScoreIdentity, fit_threshold

    work = Path(args.work)
    scores = work / "scores.parquet"
    t0 = time.perf_counter()
    make_input(scores, args.rows)
    print(f"input: {args.rows} rows, {scores.stat().st_size / 2**20:.0f} MiB ({time.perf_counter() - t0:.1f} s to make or find)")
    identity = ScoreIdentity(model="ViT-B-32", pretrained="openai", classnames_sha256="0" * 64, templates_sha256="1" * 64)
    threshold = work / "T.json"
    # Fitted on a standard normal sample: keeps about 95% of the rows.
    import numpy as np

    fit_threshold(np.random.default_rng(1).normal(size=100_000).astype(np.float32), identity).save(threshold)

    results = {}
    modes = ["stream"] + ([] if args.skip_in_memory else ["in-memory"])
    for mode in modes:
        runs = [run_child(mode, scores, threshold, work / f"kept_{mode}.parquet", args.batch_rows) for _ in range(args.repeats)]
        walls = sorted(r["wall_s"] for r in runs)
        med = statistics.median(walls)
        results[mode] = {
            "median_s": med, "min_s": walls[0], "rows_per_s": args.rows / med,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "base_rss_mb": runs[0]["base_rss_mb"],
            "peak_extra_mb": max(r["peak_rss_mb"] - r["base_rss_mb"] for r in runs),
            "rows": runs[0]["rows"], "kept": runs[0]["kept"],
        }  # fmt: skip
        r = results[mode]
        print(
            f"{mode:9s}: median {med:.2f} s (min {walls[0]:.2f} s, {args.repeats} runs), {r['rows_per_s'] / 1e6:.2f} M rows/s, "
            f"peak RSS {r['peak_rss_mb']:.0f} MB ({r['peak_extra_mb']:.0f} MB above the {r['base_rss_mb']:.0f} MB after imports); "
            f"kept {r['kept']} of {r['rows']}"
        )
    if len(results) == 2:
        s, m = results["stream"], results["in-memory"]
        print(f"stream vs in-memory: {m['median_s'] / s['median_s']:.2f}x the speed, {s['peak_extra_mb'] / m['peak_extra_mb']:.1%} of the peak extra memory")
    write_json(Path(args.out) / "filter.json", {"environment": environment(), "batch_rows": args.batch_rows, "results": results}, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
