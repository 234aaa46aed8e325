"""Fused C++ CPU scoring vs plain eager PyTorch vs the reference (targets of docs/architecture.md §5).

Default shape: N = 200,000 rows, D = 512, K = 1000 classes, float32, on this CPU. Targets:
``deltakern-cpp`` at least 2x faster than eager, and its peak extra memory below 5% of eager's.

    python bench/bench_cpu_score.py [--n 200000 --k 1000 --d 512] [--compile] [--out out/bench]

Writes OUT/cpu_score.json and .csv; prints the table and the two ratios.
"""

from __future__ import annotations

import argparse
import sys

from deltakern import bench as bm
from deltakern.bench import suite as bs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000, help="rows N")
    p.add_argument("--k", type=int, default=1000, help="classes K")
    p.add_argument("--d", type=int, default=512, help="embedding dimension D")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the reference (compiles first)")
    p.add_argument("--min-time", type=float, default=3.0, help="seconds of timed calls per provider (at least 3 calls)")
    p.add_argument("--out", default="out/bench", help="output directory")
    args = p.parse_args(argv)

    providers = ["deltakern-cpp", "deltakern-reference", "eager", "torch.mm"] + (["compile-reference"] if args.compile else [])
    options = bs.RunOptions(timing=bm.TimingConfig(min_repeats=3, min_time_s=args.min_time), providers=providers)
    meta = {"command": " ".join(["python", "bench/bench_cpu_score.py"] + (argv if argv is not None else sys.argv[1:])), **bm.environment()}
    rows = bs.run_suite([bs.score_case(args.n, args.k, args.d)], options,
                        on_case=bs.results_writer(args.out, "cpu_score", meta))
    print(bm.format_table(rows))
    for c in bs.compare(rows, "deltakern-cpp", "eager"):
        mem = "-" if c["memory_fraction"] is None else f"{100 * c['memory_fraction']:.2f}%"
        print(f"{c['shape']}: deltakern-cpp {c['provider_ms']:.1f} ms vs eager {c['baseline_ms']:.1f} ms -> "
              f"{c['speedup']:.2f}x faster (target >= 2x); peak extra memory {c['provider_mb']:.1f} MB vs "
              f"{c['baseline_mb']:.1f} MB -> {mem} of eager's (target < 5%)")
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
