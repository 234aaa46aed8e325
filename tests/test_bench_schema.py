"""The benchmark harness: result files follow the documented schema, wrong answers are refused,
and the measuring helpers (quantiles, relative columns, peak memory) compute what they claim.

Timings themselves are never asserted (they depend on the machine); shapes are tiny.
"""

from __future__ import annotations

import csv
import datetime as dt
import json

import numpy as np
import pytest
import torch

from deltakern import bench as bm
from deltakern.bench import providers as bp
from deltakern.bench import suite as bs
from deltakern.cli import main

TINY = ["--n", "37", "--k", "11", "--d", "24"]


def _read(out_dir, name="results"):
    doc = json.loads((out_dir / f"{name}.json").read_text())
    with open(out_dir / f"{name}.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    return doc, table


def test_cli_writes_json_and_csv_with_the_documented_schema(tmp_path, capsys):
    out = tmp_path / "res"
    code = main(["bench", "--device", "cpu", *TINY, "--out", str(out), "--min-time", "0",
                 "--providers", "deltakern-cpp", "deltakern-reference", "eager", "torch.mm",
                 "deltakern-fused", "autograd-reference", "torch.mm-fwd-bwd"])
    assert code == 0
    doc, table = _read(out)
    assert doc["schema"] == bm.SCHEMA
    assert doc["fields"] == list(bm.ROW_FIELDS)
    assert doc["meta"]["command"].startswith("deltakern")
    rows = doc["rows"]
    for row in rows:
        bm.validate_row(row)  # every field present, nothing extra, right types
    got = {(r["suite"], r["provider"]) for r in rows}
    assert {("score", "deltakern-cpp"), ("score", "deltakern-reference"), ("score", "eager"), ("score", "torch.mm")} <= got
    assert ("loss", "autograd-reference") in got and ("loss", "torch.mm-fwd-bwd") in got
    assert not any(p == "compile-reference" for _, p in got)  # --providers filters
    for r in rows:
        assert r["status"] == "ok", r
        assert (r["n"], r["k"], r["d"]) == (37, 11, 24)
        assert r["median_ms"] > 0 and r["q20_ms"] <= r["median_ms"] <= r["q80_ms"]
        assert r["rows_per_s"] == pytest.approx(37 / (r["median_ms"] / 1e3))
        assert r["peak_extra_mb"] is not None and r["peak_extra_mb"] >= 0
        assert r["memory_method"] in ("child_rss_hwm", "child_ru_maxrss")
        assert r["device"] == "cpu" and r["dtype"] == "float32" and r["torch"] == torch.__version__
        dt.datetime.fromisoformat(r["timestamp"])
        if r["kind"] == "ceiling":
            assert r["pct_of_ceiling"] == pytest.approx(100.0)
        elif r["check"] != "reference":
            assert r["check"] == "passed" and 0 <= r["check_max_err"] <= 1
    eager = next(r for r in rows if r["provider"] == "eager")
    assert eager["speedup_vs_baseline"] == pytest.approx(1.0) and eager["baseline"] == "eager"
    # The CSV holds the same rows and columns.
    assert list(table[0].keys()) == list(bm.ROW_FIELDS)
    assert [(t["suite"], t["provider"]) for t in table] == [(r["suite"], r["provider"]) for r in rows]
    for t, r in zip(table, rows):
        assert float(t["median_ms"]) == pytest.approx(r["median_ms"])
    printed = capsys.readouterr().out
    assert "deltakern-cpp" in printed and "results.json" in printed


def _broken(field: str):
    """A provider returning the reference's scores with one field corrupted."""
    calls = []

    def factory(case):
        def impl(X, W):
            calls.append(1)
            out = bp.eager_scores(X, W, c=case.c)
            if field == "pred":
                out["pred"] = (out["pred"] + 1) % case.k
            else:
                out[field] = out[field] * (1 + 1e-3)
            return out

        return impl

    return bp.Provider(f"broken-{field}", "baseline", factory), calls


@pytest.mark.parametrize("field", ["delta_energy", "msp", "pred"])
def test_a_wrong_answer_is_refused_and_not_timed(field):
    broken, calls = _broken(field)
    providers = {p.name: p for p in bp.score_providers("cpu").values() if p.name in ("deltakern-reference", "eager")}
    providers[broken.name] = broken
    rows = bs.run_suite([bp.score_case(40, 9, 16)], bs.RunOptions(memory=False, timing=bm.TimingConfig(min_time_s=0)),
                        providers={"score": providers}, progress=False)
    row = next(r for r in rows if r["provider"] == broken.name)
    assert row["status"] == "refused"
    assert field in row["check"]
    assert row["median_ms"] is None and row["repeats"] is None and row["speedup_vs_baseline"] is None
    assert len(calls) == 1  # called once for the check, never timed
    eager = next(r for r in rows if r["provider"] == "eager")
    assert eager["status"] == "ok" and eager["check"] == "passed"  # a right answer in the same case passes
    bm.validate_row(row)


def test_a_wrong_gradient_is_refused():
    case = bp.loss_case(16, 5, 12)
    providers = {p.name: p for p in bp.loss_providers("cpu").values()}
    reference = providers["autograd-reference"]

    def factory(case):
        step = reference.factory(case)
        return lambda X, W, labels: {**step(X, W, labels), "dW": step(X, W, labels)["dW"] * 1.01}

    providers["scaled-dW"] = bp.Provider("scaled-dW", "baseline", factory)
    rows = bs.run_suite([case], bs.RunOptions(memory=False, timing=bm.TimingConfig(min_time_s=0)),
                        providers={"loss": providers}, progress=False)
    by_name = {r["provider"]: r for r in rows}
    assert by_name["scaled-dW"]["status"] == "refused" and "dW" in by_name["scaled-dW"]["check"]
    if "deltakern-fused" in by_name:  # the fused loss matches its reference
        assert by_name["deltakern-fused"]["status"] == "ok" and by_name["deltakern-fused"]["check"] == "passed"


def test_cli_exits_nonzero_and_records_a_refusal(tmp_path, monkeypatch):
    broken, _ = _broken("energy")
    real = bp.score_providers
    monkeypatch.setattr(bs, "providers_for", lambda case: {**real(case.device), broken.name: broken})
    out = tmp_path / "res"
    code = main(["bench", "--device", "cpu", "--suite", "score", *TINY, "--out", str(out), "--no-memory",
                 "--min-time", "0", "--providers", "eager", broken.name])
    assert code == 1
    doc, _ = _read(out)
    status = {r["provider"]: r["status"] for r in doc["rows"]}
    assert status == {"eager": "ok", broken.name: "refused"}


def test_check_sample_spreads_over_all_rows():
    X = torch.randn(1000, 4)
    idx = bs._check_sample(bp.score_case(1000, 3, 4), (X,), 10)
    assert idx[0] == 0 and idx[-1] == 999 and idx.numel() == 10
    assert bs._check_sample(bp.score_case(1000, 3, 4), (X,), None) is None
    assert bs._check_sample(bp.loss_case(1000, 3, 4), (X,), 10) is None


def test_summary_statistics_match_numpy():
    times = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    t = bm.summarize(times, "perf_counter")
    assert t.median_ms == pytest.approx(np.median(times))
    assert t.q20_ms == pytest.approx(np.percentile(times, 20))
    assert t.q80_ms == pytest.approx(np.percentile(times, 80))
    assert (t.min_ms, t.mean_ms, t.repeats) == (1.0, pytest.approx(np.mean(times)), 6)
    with pytest.raises(ValueError, match="times_ms"):
        bm.summarize([], "perf_counter")


def test_relative_columns_by_hand():
    def row(provider, ms, gflops):
        return bm.new_row(suite="score", provider=provider, status="ok", device="cpu", dtype="float32",
                          n=10, k=3, d=4, c=1, median_ms=ms, gflop_per_s=gflops)

    rows = [row("torch.mm", 1.0, 40.0), row("eager", 8.0, 5.0), row("fast", 2.0, 20.0)]
    bm.add_relative_columns(rows, ceiling="torch.mm", baseline="eager")
    fast = rows[2]
    assert fast["pct_of_ceiling"] == pytest.approx(50.0)
    assert fast["speedup_vs_baseline"] == pytest.approx(4.0)
    assert fast["ceiling"] == "torch.mm" and fast["baseline"] == "eager"


def test_validate_row_rejects_missing_extra_and_mistyped_fields():
    good = bm.new_row(suite="score", provider="p", kind="baseline", status="ok", device="cpu",
                      device_name="x", dtype="float32", n=1, k=1, d=1, c=1, shape="s", flops=1.0,
                      bytes=1.0, deltakern="0", torch="t", python="3", threads=1, timestamp="now")
    bm.validate_row(good)
    with pytest.raises(ValueError, match="missing"):
        bm.validate_row({k: v for k, v in good.items() if k != "median_ms"})
    with pytest.raises(ValueError, match="extra"):
        bm.validate_row({**good, "surprise": 1})
    with pytest.raises(ValueError, match="'n'"):
        bm.validate_row({**good, "n": "1"})


def test_peak_rss_extra_sees_an_allocation():
    size = 64 * 2**20

    def allocate():
        t = torch.ones(size // 4, dtype=torch.float32)  # touched, so resident
        return float(t[-1])

    extra, method = bm.peak_rss_extra(allocate)
    assert method in ("child_rss_hwm", "child_ru_maxrss")
    if method == "child_rss_hwm":
        assert 0.9 * size <= extra <= 3 * size


def test_profile_traces_are_chrome_traces(tmp_path):
    paths = bs.profile_traces("cpu", tmp_path, n=16, k=5, d=8)
    assert [p.name for p in paths] == ["trace_score_cpu.json", "trace_loss_cpu.json"]
    for path in paths:
        doc = json.loads(path.read_text())
        names = {e.get("name", "") for e in doc["traceEvents"]}
        assert any("mm" in n or "matmul" in n or "deltakern" in n for n in names)


def test_row_blocks_halve_on_out_of_memory_and_give_the_same_answer():
    X, W = torch.randn(50, 8), torch.randn(6, 8)
    sizes = []

    def body(x, w):
        sizes.append(x.shape[0])
        if x.shape[0] > 12:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")
        return bp.eager_scores(x, w)

    blocks = bp.RowBlocks(body, combine=bp._cat_dicts)
    out = blocks(X, W)
    full = bp.eager_scores(X, W)
    for name in full:
        assert torch.equal(out[name], full[name]), name
    assert blocks.rows == 12 and "12-row blocks" in blocks.note
    assert sizes[:3] == [50, 25, 12]
    blocks(X, W)  # the block size found is kept: no further failures
    assert max(sizes[-5:]) <= 12


def test_check_on_sampled_rows_runs_end_to_end():
    options = bs.RunOptions(memory=False, rotations=3, check_rows=16, timing=bm.TimingConfig(min_time_s=0),
                            providers=["eager", "compile-reference"])
    rows = bs.run_suite([bp.score_case(300, 13, 16)], options, progress=False)
    assert [r["provider"] for r in rows] == ["eager", "compile-reference"]  # the reference only checks
    for r in rows:
        assert r["status"] == "ok", r
        assert r["check"] == "passed on 16 rows spread over N"
