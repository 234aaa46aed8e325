"""``deltakern bench``: benchmark every provider, print a table, write JSON + CSV (and traces)."""

from __future__ import annotations

import argparse
import sys

from deltakern.core.errors import InvalidArgument

DTYPES = ("float32", "bfloat16", "float16")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark deltakern against eager PyTorch, torch.compile and a bare matmul",
        description=(
            "Time the scoring and EBM-loss providers (deltakern's backends, plain eager PyTorch, "
            "torch.compile of the reference, and a bare matmul as the ceiling) on standard shapes. "
            "Every provider's output is first checked against the reference; a wrong answer is "
            "refused, not timed. Reports median and 20/80% quantiles, rows/s, FLOP/s, GB/s, "
            "% of the matmul ceiling, speedup vs the baseline and peak extra memory; writes "
            "OUT/results.json and OUT/results.csv. Exit status 1 when a provider was refused or failed."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small shapes and short timing (under a minute on a 2-core CPU)")
    p.add_argument(
        "--device", choices=("cpu", "cuda", "all"), default="all",
        help="where to run; 'all' means the CPU plus CUDA when a GPU is present",
    )
    p.add_argument("--out", default="out/bench", help="directory for results.json, results.csv and traces")
    p.add_argument("--profile", action="store_true", help="also write torch.profiler Chrome traces of one scoring call and one loss step")
    p.add_argument("--suite", choices=("score", "loss", "all"), default="all", help="which benchmarks to run")
    shapes = p.add_argument_group("custom shapes (replace the standard cases when given)")
    shapes.add_argument("--n", type=int, nargs="+", help="rows N (the batch B for the loss)")
    shapes.add_argument("--k", type=int, nargs="+", help="classes K")
    shapes.add_argument("--d", type=int, default=512, help="embedding dimension D")
    shapes.add_argument("--c", type=int, default=1, help="top-c of the scores")
    shapes.add_argument("--dtype", choices=DTYPES, nargs="+", help="input dtypes (default float32 on CPU, bfloat16 and float32 on CUDA)")
    p.add_argument("--providers", nargs="+", metavar="NAME", help="time only these providers (e.g. deltakern-cpp eager torch.mm); the reference still checks them")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement (saves a child process per CPU case)")
    p.add_argument("--min-time", type=float, default=None, help="CPU: keep repeating a provider until this many seconds were timed")
    p.add_argument("--name", default="results", help="file stem of the JSON/CSV files")
    p.set_defaults(func=run)


def _devices(choice: str) -> list[str]:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("--device cuda needs a CUDA GPU, but torch.cuda.is_available() is False")
    if choice == "all":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [choice]


def _cases(args: argparse.Namespace, device: str, suites: tuple[str, ...]) -> list:
    from deltakern.bench.suite import default_cases, loss_case, score_case

    custom = args.n is not None or args.k is not None or args.dtype is not None
    if not custom:
        return default_cases(device, quick=args.quick, suites=suites)
    ns = args.n or ([8192] if device == "cpu" else [1_000_000])
    ks = args.k or [1000]
    dtypes = args.dtype or (["float32"] if device == "cpu" else ["bfloat16", "float32"])
    for name, values in (("--n", ns), ("--k", ks), ("--d", [args.d]), ("--c", [args.c])):
        if min(values) < 1:
            raise InvalidArgument(f"{name} must be >= 1, got {values}")
    if args.c > min(ks):
        raise InvalidArgument(f"--c must be <= every --k, got c={args.c} with K={min(ks)}")
    cases = []
    for dt in dtypes:
        for n in ns:
            for k in ks:
                if "score" in suites:
                    cases.append(score_case(n, k, args.d, args.c, dt, device))
                if "loss" in suites:
                    cases.append(loss_case(n, k, args.d, dt, device))
    return cases


def run(args: argparse.Namespace) -> int:
    from deltakern import bench as bm
    from deltakern.bench import suite as bs

    suites = ("score", "loss") if args.suite == "all" else (args.suite,)
    timing = bm.TimingConfig(warmup=0, min_time_s=0.2, max_repeats=20, gpu_warmup_ms=10, gpu_rep_ms=40) if args.quick else bm.TimingConfig()
    if args.min_time is not None:
        timing = bm.TimingConfig(**{**timing.__dict__, "min_time_s": args.min_time})
    options = bs.RunOptions(
        timing=timing, memory=not args.no_memory, providers=args.providers,
        check_rows=65_536 if "cuda" in _devices(args.device) else None,  # the reference sorts every row
    )
    rows, traces = [], []
    for device in _devices(args.device):
        cases = _cases(args, device, suites)
        if "loss" in suites and not bs.loss_providers(device):
            print(f"note: no loss rows on {device}: {bs.loss_modules_status(device)}", file=sys.stderr)
        rows += bs.run_suite(cases, options)
        if args.profile:
            traces += bs.profile_traces(device, args.out)
    meta = {"command": " ".join(["deltakern"] + sys.argv[1:]), "quick": args.quick, **bm.environment()}
    json_path, csv_path = bm.write_results(rows, args.out, name=args.name, meta=meta)
    print(bm.format_table(rows))
    print(f"wrote {json_path} and {csv_path}")
    for path in traces:
        print(f"wrote trace {path} (open in chrome://tracing or https://ui.perfetto.dev)")
    bad = [r for r in rows if r["status"] in ("refused", "error")]
    for r in bad:
        print(f"{r['status']}: {r['provider']} {r['shape']} {r['dtype']}: {r['check'] or r['notes']}", file=sys.stderr)
    return 1 if bad else 0
