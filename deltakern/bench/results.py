"""Benchmark result rows: their schema, derived throughput and relative columns, and the JSON,
CSV and text-table outputs (written atomically)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from deltakern.bench.harness import Timing
from deltakern.core.errors import InvalidArgument
from deltakern.data.atomic import write_text

SCHEMA = "deltakern-bench/1"

# The documented schema of one result row: field -> accepted types. Timings and derived
# throughput are None when the row was not timed (refused, skipped or failed).
_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_OPT_STR = (str, type(None))
ROW_FIELDS: dict[str, tuple[type, ...]] = {
    "suite": (str,),  # "score" | "loss"
    "provider": (str,),  # e.g. "deltakern-cpp", "eager", "compile-reference", "torch.mm"
    "kind": (str,),  # "deltakern" | "baseline" | "ceiling"
    "status": (str,),  # "ok" | "refused" | "skipped" | "error"
    "device": (str,),  # "cpu" | "cuda"
    "device_name": (str,),
    "dtype": (str,),
    "n": (int,),  # rows (the batch B for the loss)
    "k": (int,),
    "d": (int,),
    "c": (int, type(None)),  # top-c of the scores; None for the loss
    "shape": (str,),
    "timer": (str,),  # "perf_counter" | "do_bench" | "cuda_events" | "none"
    "repeats": (int, type(None)),
    "median_ms": _OPT_NUM,
    "q20_ms": _OPT_NUM,
    "q80_ms": _OPT_NUM,
    "min_ms": _OPT_NUM,
    "mean_ms": _OPT_NUM,
    "rows_per_s": _OPT_NUM,
    "gflop_per_s": _OPT_NUM,
    "gb_per_s": _OPT_NUM,
    "flops": _NUM,  # nominal FLOPs of one call
    "bytes": _NUM,  # nominal minimal bytes of one call (inputs read once, outputs written once)
    "ceiling": _OPT_STR,  # the provider whose rate is 100%
    "pct_of_ceiling": _OPT_NUM,
    "baseline": _OPT_STR,  # the provider speedups are relative to
    "speedup_vs_baseline": _OPT_NUM,
    "peak_extra_mb": _OPT_NUM,
    "memory_method": _OPT_STR,  # "cuda_allocator" | "child_rss_hwm" | "child_ru_maxrss" | None
    "check": (str,),  # how the output was checked against the reference, or why it was refused
    "check_max_err": _OPT_NUM,  # worst error relative to the contract's bound (<= 1 passes)
    "notes": (str,),
    "deltakern": (str,),
    "torch": (str,),
    "triton": _OPT_STR,
    "python": (str,),
    "threads": (int,),
    "git_commit": _OPT_STR,
    "timestamp": (str,),
}


class WrongAnswerError(ValueError):
    """A provider's output disagrees with the reference: it is not benchmarked."""


# ----------------------------------------------------------------------------- derived numbers


def derived(timing: Timing | None, *, rows: int, flops: float, nbytes: float) -> dict[str, float | None]:
    """rows/s, GFLOP/s and GB/s at the median time (None when not timed)."""
    if timing is None or timing.median_ms <= 0:
        return {"rows_per_s": None, "gflop_per_s": None, "gb_per_s": None}
    seconds = timing.median_ms / 1e3
    return {
        "rows_per_s": rows / seconds,
        "gflop_per_s": flops / seconds / 1e9,
        "gb_per_s": nbytes / seconds / 1e9,
    }


def add_relative_columns(rows: list[dict], *, ceiling: str, baseline: str) -> None:
    """Fill ``pct_of_ceiling`` and ``speedup_vs_baseline`` for rows of the same case.

    Rows are grouped by (suite, device, dtype, n, k, d, c). The percentage compares FLOP rates
    (the ceiling is a bare matmul of the same shape and dtype); the speedup compares medians.
    """
    key = lambda r: (r["suite"], r["device"], r["dtype"], r["n"], r["k"], r["d"], r["c"])  # noqa: E731
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    for group in groups.values():
        by_name = {r["provider"]: r for r in group if r["status"] == "ok"}
        top = by_name.get(ceiling)
        base = by_name.get(baseline)
        for row in group:
            row["ceiling"] = ceiling if top else None
            row["baseline"] = baseline if base else None
            if row["status"] != "ok":
                continue
            if top and top["gflop_per_s"] and row["gflop_per_s"] is not None:
                row["pct_of_ceiling"] = 100.0 * row["gflop_per_s"] / top["gflop_per_s"]
            if base and base["median_ms"]:
                row["speedup_vs_baseline"] = base["median_ms"] / row["median_ms"]


def validate_row(row: dict) -> None:
    """Raise ValueError when ``row`` does not follow :data:`ROW_FIELDS`."""
    missing = set(ROW_FIELDS) - set(row)
    extra = set(row) - set(ROW_FIELDS)
    if missing or extra:
        raise InvalidArgument(f"result row fields differ from the schema: missing {sorted(missing)}, extra {sorted(extra)}")
    for name, types in ROW_FIELDS.items():
        value = row[name]
        if isinstance(value, bool) or not isinstance(value, types):
            raise InvalidArgument(f"result row field {name!r} must be {types}, got {type(value).__name__} {value!r}")


def new_row(**fields: Any) -> dict:
    """A result row with every schema field present (None/"" defaults), updated by ``fields``."""
    row: dict[str, Any] = {name: None for name in ROW_FIELDS}
    row.update(check="", notes="", timer="none")
    row.update(fields)
    return row


# ----------------------------------------------------------------------------- output


def _json_number(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_results(rows: list[dict], out_dir: str | Path, *, name: str = "results", meta: dict | None = None) -> tuple[Path, Path]:
    """Write ``<name>.json`` (``{"schema", "meta", "rows"}``) and ``<name>.csv`` atomically."""
    for row in rows:
        validate_row(row)
    out_dir = Path(out_dir)
    clean = [{k: _json_number(v) for k, v in row.items()} for row in rows]
    doc = {"schema": SCHEMA, "meta": meta or {}, "fields": list(ROW_FIELDS), "rows": clean}
    json_path, csv_path = out_dir / f"{name}.json", out_dir / f"{name}.csv"
    write_text(json_path, json.dumps(doc, indent=2, allow_nan=False) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(ROW_FIELDS))
    writer.writeheader()
    writer.writerows(clean)
    write_text(csv_path, buf.getvalue())
    return json_path, csv_path


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec)


def _si(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.1f}"


def format_table(rows: list[dict], tablefmt: str = "github") -> str:
    """The result rows as a text table (one line per provider and case); a GitHub-markdown
    table by default (tabulate), plain aligned columns where tabulate is not installed."""

    body = []
    for r in rows:
        shape = r["shape"]
        spread = (
            f"{r['median_ms']:.3f} ({r['q20_ms']:.3f}-{r['q80_ms']:.3f})" if r["median_ms"] is not None else "-"
        )
        rate = r["gflop_per_s"]
        flops = "-" if rate is None else (f"{rate / 1e3:.1f} T" if rate >= 1e3 else f"{rate:.1f} G")
        status = "ok" if r["status"] == "ok" else f"{r['status']}: {r['check'] or r['notes']}"
        body.append([
            r["provider"], r["device"], r["dtype"], shape, spread, _si(r["rows_per_s"]), flops,
            _fmt(r["gb_per_s"], ".1f"), _fmt(r["pct_of_ceiling"], ".0f"),
            _fmt(r["speedup_vs_baseline"], ".2f"), _fmt(r["peak_extra_mb"], ".1f"), status,
        ])
    headers = ["provider", "dev", "dtype", "shape", "median ms (q20-q80)", "rows/s", "FLOP/s", "GB/s",
               "% ceiling", "x baseline", "peak extra MB", "check"]
    try:
        from tabulate import tabulate
    except ImportError:  # e.g. a bare GPU image: the numbers matter more than the frame
        widths = [max(len(str(x)) for x in col) for col in zip(headers, *body)]
        return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [headers, *body])
    return tabulate(body, headers=headers, tablefmt=tablefmt, disable_numparse=True)
