"""The benchmark runner behind ``deltakern bench``: standard cases, check-then-time, profiles.

For every case the reference provider runs first; every other provider's output on the same
inputs is checked against it (:func:`deltakern.bench.providers.check_output`) and only then
timed, its peak extra memory measured (CUDA allocator, or a child process on CPU) and its
throughput derived. A provider whose answer is wrong is refused: its row has status
``"refused"`` and no timings. See :mod:`deltakern.bench.providers` for the providers.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltakern import bench as bm
from deltakern.bench.providers import (
    Case,
    Provider,
    _is_oom,
    case_call,
    check_output,
    loss_case,
    loss_providers,
    make_inputs,
    providers_for,
    score_case,
)
from deltakern.core.errors import InvalidArgument
from deltakern.data.atomic import atomic_path

SUITE_CEILING = {"score": "torch.mm", "loss": "torch.mm-fwd-bwd"}
SUITE_BASELINE = {"score": "eager", "loss": "autograd-reference"}


def default_cases(device: str, *, quick: bool, suites: Sequence[str] = ("score", "loss")) -> list[Case]:
    """The standard shapes: a small CPU set (quicker with ``quick``) or the large GPU set."""
    cases: list[Case] = []
    if device == "cpu":
        if quick:
            score = [score_case(4096, k) for k in (100, 1000)]
            loss = [loss_case(256, 1000)]
        else:
            score = [score_case(10_000, k) for k in (10, 100, 1000, 5000, 20_000)]
            loss = [loss_case(256, 1000), loss_case(1024, 5000)]
    else:
        if quick:
            score = [score_case(100_000, 1000, dtype="bfloat16", device=device)]
            loss = [loss_case(4096, 1000, device=device)]
        else:
            score = [
                score_case(1_000_000, k, dtype=dt, device=device)
                for dt in ("bfloat16", "float32")
                for k in (10, 1000, 20_000)
            ]
            loss = [loss_case(b, k, device=device) for b, k in ((4096, 20_000), (65_536, 20_000))]
    if "score" in suites:
        cases += score
    if "loss" in suites:
        cases += loss
    return cases


# ----------------------------------------------------------------------------- runner


@dataclass
class RunOptions:
    """How to run the suite."""

    timing: bm.TimingConfig = field(default_factory=bm.TimingConfig)
    memory: bool = True
    rotations: int | None = None  # input variants cycled while timing (default: 3 on CUDA, 1 on CPU)
    providers: Sequence[str] | None = None  # names to time (default: all; the reference always checks)
    check_rows: int | None = None  # check scores on this many rows spread over N (default: all rows)


def _base_row(case: Case, provider: Provider, env: dict, device_name: str) -> dict:
    return bm.new_row(
        suite=case.suite, provider=provider.name, kind=provider.kind, status="ok",
        device=torch.device(case.device).type, device_name=device_name, dtype=case.dtype,
        n=case.n, k=case.k, d=case.d, c=case.c, shape=case.shape(),
        flops=case.flops(), bytes=case.bytes(), **env,
    )


def _rotating(impl: Callable, variants: list[tuple]) -> Callable[[], Any]:
    cycle = itertools.cycle(variants)
    return lambda: impl(*next(cycle))


def _check_sample(case: Case, inputs: tuple, check_rows: int | None) -> torch.Tensor | None:
    """Rows to check (spread over all of N, so large row offsets are covered), or None for all.
    The loss is checked on the whole batch: its mean and dW couple every row."""
    if case.suite != "score" or not check_rows or case.n <= check_rows:
        return None
    return torch.linspace(0, case.n - 1, check_rows, device=inputs[0].device).round().long().unique()


def run_case(
    case: Case,
    providers: dict[str, Provider],
    options: RunOptions,
    *,
    env: dict,
    child: bm.ChildMemory | None = None,
) -> list[dict]:
    """Check, time and measure the providers on one case; one result row per timed provider.

    ``providers`` must contain the suite's reference provider: its output on the case's inputs
    (or on the sampled rows of ``options.check_rows``) is what every other provider is checked
    against. It gets a row of its own only when ``options.providers`` selects it (or is None).
    """
    device = torch.device(case.device)
    name = bm.device_name(device)
    ref_provider = next((p for p in providers.values() if p.reference), None)
    if ref_provider is None:
        raise InvalidArgument(f"no reference provider among {sorted(providers)} for the {case.suite} suite")
    selected = [p for p in providers.values() if options.providers is None or p.name in options.providers]
    rotations = options.rotations or (3 if device.type == "cuda" else 1)
    variants = make_inputs(case, rotations)
    sample = _check_sample(case, variants[0], options.check_rows)
    check_inputs = variants[0] if sample is None else (variants[0][0][sample],) + variants[0][1:]
    ref_impl = ref_provider.factory(case)
    expected = ref_impl(*check_inputs)
    rows = []
    for provider in selected:
        row = _base_row(case, provider, env, name)
        rows.append(row)
        try:
            impl = ref_impl if provider is ref_provider else provider.factory(case)
            # The first call on the full inputs is checked and is also the warm-up
            # (compilation, lazy initialisation).
            out = impl(*variants[0])
            if provider is ref_provider:
                row["check"] = "reference"
            elif provider.checked:
                actual = out if sample is None else {k: v[sample] for k, v in out.items()}
                row["check_max_err"] = check_output(case, actual, expected, check_inputs)
                row["check"] = "passed" if sample is None else f"passed on {sample.numel()} rows spread over N"
            else:
                row["check"] = "not a scorer (ceiling)"
            del out
            timing = bm.time_call(_rotating(impl, variants), device, options.timing)
        except bm.WrongAnswerError as exc:
            row.update(status="refused", check=f"wrong answer, not timed: {exc}")
            continue
        except Exception as exc:  # one failing provider must not hide the others' numbers
            if device.type == "cuda" and _is_oom(exc):
                torch.cuda.empty_cache()
            row.update(status="error", notes=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            continue
        row.update(
            timer=timing.timer, repeats=timing.repeats, median_ms=timing.median_ms, q20_ms=timing.q20_ms,
            q80_ms=timing.q80_ms, min_ms=timing.min_ms, mean_ms=timing.mean_ms,
            **bm.derived(timing, rows=case.n, flops=case.flops(), nbytes=case.bytes()),
        )
        if options.memory:
            try:
                if device.type == "cuda":
                    peak, method = bm.peak_cuda_extra(lambda: impl(*variants[0]), device), "cuda_allocator"
                elif child is not None:
                    peak, method = child.measure(case_call, asdict(case), provider.name)
                else:
                    peak, method = None, None
            except Exception as exc:
                peak, method = None, None
                row["notes"] = f"memory not measured: {exc}"
            row["peak_extra_mb"] = None if peak is None else peak / 2**20
            row["memory_method"] = method
        # A note set while running (e.g. eager fell back to row blocks) goes first.
        row["notes"] = "; ".join(filter(None, [getattr(impl, "note", ""), row["notes"]]))
    bm.add_relative_columns(rows, ceiling=SUITE_CEILING[case.suite], baseline=SUITE_BASELINE[case.suite])
    return rows


def run_suite(
    cases: Sequence[Case],
    options: RunOptions | None = None,
    *,
    providers: dict[str, dict[str, Provider]] | None = None,
    progress: bool = True,
    on_case: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Run every case and return all rows.

    ``providers`` maps a suite name to its providers (default: all usable on the case's
    device); ``on_case(rows_so_far)`` is called after each case (e.g. to save partial results).
    """
    try:
        from tqdm import tqdm
    except ImportError:  # a bare GPU image may lack it; the progress bar is a convenience
        tqdm = None
    options = options or RunOptions()
    env = bm.environment()
    child = bm.ChildMemory() if options.memory and any(c.device == "cpu" for c in cases) else None
    rows: list[dict] = []
    try:
        bar = tqdm(cases, desc="bench", unit="case", disable=not progress) if tqdm else cases
        for case in bar:
            if tqdm:
                bar.set_postfix_str(f"{case.suite} {case.shape()} {case.dtype} {case.device}")
            chosen = (providers or {}).get(case.suite) or providers_for(case)
            if not chosen:
                continue
            rows += run_case(case, chosen, options, env=env, child=child)
            if on_case is not None:
                on_case(rows)
    finally:
        if child is not None:
            child.close()
    return rows


# ----------------------------------------------------------------------------- profiling


def _atomic_trace(prof, path: Path) -> Path:
    with atomic_path(path) as tmp:
        prof.export_chrome_trace(str(tmp))
    return path


def profile_traces(device: str, out_dir: str | Path, *, n: int = 8192, k: int = 1000, d: int = 512) -> list[Path]:
    """Chrome traces (``torch.profiler``) of one scoring call and one loss step on ``device``.

    Each is preceded by an untraced warm-up call, so the trace shows the steady state.
    """
    from torch.profiler import ProfilerActivity, profile

    from deltakern.scoring import score

    activities = [ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    kind = torch.device(device).type
    paths = []
    X, W = make_inputs(Case("score", n, k, d, 1, "float32", device))[0]
    score(X, W)
    with profile(activities=activities, record_shapes=True) as prof:
        score(X, W)
    paths.append(_atomic_trace(prof, Path(out_dir) / f"trace_score_{kind}.json"))
    loss = loss_providers(device)
    name = "deltakern-fused" if "deltakern-fused" in loss else next(iter(loss), None)
    if name is not None:
        case = loss_case(min(n, 1024), k, d, device=device)
        inputs = make_inputs(case)[0]
        step = loss[name].factory(case)
        step(*inputs)
        with profile(activities=activities, record_shapes=True) as prof:
            step(*inputs)
        paths.append(_atomic_trace(prof, Path(out_dir) / f"trace_loss_{kind}.json"))
    return paths


# ----------------------------------------------------------------------------- summaries


def compare(rows: Sequence[dict], provider: str, baseline: str) -> list[dict]:
    """Per case where both ran: ``provider``'s speedup over ``baseline`` (median times) and its
    peak extra memory as a fraction of the baseline's (None where memory was not measured)."""
    key = lambda r: (r["suite"], r["device"], r["dtype"], r["n"], r["k"], r["d"], r["c"])  # noqa: E731
    ok = {(key(r), r["provider"]): r for r in rows if r["status"] == "ok"}
    out = []
    for (case, name), row in ok.items():
        base = ok.get((case, baseline))
        if name != provider or base is None:
            continue
        mem = None
        if row["peak_extra_mb"] is not None and base["peak_extra_mb"]:
            mem = row["peak_extra_mb"] / base["peak_extra_mb"]
        out.append({
            "shape": row["shape"], "dtype": row["dtype"], "device": row["device"],
            "provider_ms": row["median_ms"], "baseline_ms": base["median_ms"],
            "speedup": base["median_ms"] / row["median_ms"], "memory_fraction": mem,
            "provider_mb": row["peak_extra_mb"], "baseline_mb": base["peak_extra_mb"],
        })
    return out


def results_writer(out_dir: str | Path, name: str, meta: dict) -> Callable[[list[dict]], None]:
    """An ``on_case`` callback for :func:`run_suite` that rewrites the results after every case,
    so a run cut short (a timeout, a lost machine) keeps what it measured."""

    def write(rows: list[dict]) -> None:
        bm.write_results(rows, out_dir, name=name, meta=meta)

    return write
