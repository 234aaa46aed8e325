"""The fused EBM loss (forward + backward) vs autograd through the plain-PyTorch reference and vs
the three bare GEMMs of the same shapes.

Shapes (float32, D = 512): B = 4096 with K = 20,000 classes, and prompt-tuning scale B = 256
with K = 1000; on a GPU also B = 65,536 with K = 20,000; ``--quick``: B = 1024, K = 5000 only.
Targets on CPU at B = 4096, K = 20,000: the fused step at most 1.5x the time of the three bare
GEMMs (forward logits X·Wᵀ, backward dX = G·W and dW = Gᵀ·X) and at most 10% of the autograd
reference's peak extra memory.

    python bench/bench_loss.py [--device cpu|cuda] [--quick] [--shapes 4096x20000 ...] [--out out/bench]

Every provider is checked against the reference, then timed and its peak extra memory measured
(CPU: the peak resident set size of a child process running one call, minus its resident size
after building the inputs and one warm-up call; CUDA: the caching allocator's peak above what
was allocated before the call). The fused step and the three GEMMs are then timed once more
side by side, alternating calls (``--pair-repeats`` each), so that a busy machine slows both
alike; the summary line per shape reports those medians, their ratio and the peak extra memory
of the fused step and of the reference. Writes OUT/loss_<device>.json and .csv.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from deltakern import bench as bm
from deltakern.bench import providers as bp
from deltakern.bench import suite as bs

CPU_SHAPES = ((4096, 20_000), (256, 1000))
GPU_SHAPES = CPU_SHAPES + ((65_536, 20_000),)
QUICK_SHAPES = ((1024, 5000),)
FUSED, REFERENCE, GEMMS = "deltakern-fused", "autograd-reference", "torch.mm-fwd-bwd"


def paired_times(case: bp.Case, repeats: int) -> dict[str, float]:
    """Median ms of the fused step and of the three GEMMs, timed in alternating calls (the order
    flips every round) after one warm-up call each."""
    providers = bp.loss_providers(case.device)
    inputs = bp.make_inputs(case)[0]
    steps = {name: providers[name].factory(case) for name in (FUSED, GEMMS)}
    sync = torch.cuda.synchronize if case.device == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for name, step in steps.items():
        step(*inputs)
    for i in range(repeats):
        for name in (FUSED, GEMMS) if i % 2 == 0 else (GEMMS, FUSED):
            sync()
            start = time.perf_counter()
            steps[name](*inputs)
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def summary_line(case: bp.Case, paired: dict[str, float], rows: list[dict]) -> str:
    """One line: fused and GEMM medians and their ratio, then the peak extra memory of the fused
    step and of the reference (from the suite's rows) and the fused share of it."""
    mem = {r["provider"]: r.get("peak_extra_mb") for r in rows
           if (r["n"], r["k"], r["d"], r["device"]) == (case.n, case.k, case.d, case.device)}
    fused_mb, ref_mb = mem.get(FUSED), mem.get(REFERENCE)
    share = f"{100 * fused_mb / ref_mb:.1f}%" if fused_mb is not None and ref_mb else "-"
    fmt = lambda v: "-" if v is None else f"{v:.0f} MB"  # noqa: E731
    return (f"{case.shape()} {case.device}: fused fwd+bwd {paired[FUSED]:.1f} ms vs three GEMMs "
            f"{paired[GEMMS]:.1f} ms -> {paired[FUSED] / paired[GEMMS]:.2f}x; peak extra memory fused "
            f"{fmt(fused_mb)}, reference {fmt(ref_mb)} -> {share}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--shapes", nargs="+", metavar="BxK", help="override the shapes, e.g. 4096x20000 256x1000")
    p.add_argument("--quick", action="store_true", help="one small shape (B = 1024, K = 5000)")
    p.add_argument("--d", type=int, default=512, help="embedding dimension D")
    p.add_argument("--min-time", type=float, default=2.0, help="CPU: seconds of timed calls per provider")
    p.add_argument("--pair-repeats", type=int, default=7,
                   help="alternating calls of the fused step and of the three GEMMs, each (0: skip)")
    p.add_argument("--out", default="out/bench", help="output directory")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA GPU")
    if args.pair_repeats < 0:
        p.error(f"--pair-repeats must be >= 0, got {args.pair_repeats}")
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    else:
        shapes = QUICK_SHAPES if args.quick else (GPU_SHAPES if args.device == "cuda" else CPU_SHAPES)
    cases = [bs.loss_case(b, k, args.d, device=args.device) for b, k in shapes]
    if not bs.loss_providers(args.device):
        print(f"no loss providers on {args.device}: {bs.loss_modules_status(args.device)}", file=sys.stderr)
        return 1
    meta = {"command": " ".join(["python", "bench/bench_loss.py"] + (argv if argv is not None else sys.argv[1:])), **bm.environment()}
    options = bs.RunOptions(timing=bm.TimingConfig(min_repeats=3, min_time_s=args.min_time))
    rows = bs.run_suite(cases, options, on_case=bs.results_writer(args.out, f"loss_{args.device}", meta))
    print(bm.format_table(rows))
    for c in bs.compare(rows, FUSED, REFERENCE):
        mem = "-" if c["memory_fraction"] is None else f"{100 * c['memory_fraction']:.1f}%"
        print(f"{c['shape']} {c['device']}: fused fwd+bwd {c['provider_ms']:.1f} ms vs autograd reference "
              f"{c['baseline_ms']:.1f} ms -> {c['speedup']:.2f}x; peak extra memory {mem} of the reference's")
    fused_ok = {(r["n"], r["k"]) for r in rows if r["provider"] == FUSED and r["status"] == "ok"}
    if args.pair_repeats:
        print(f"side by side ({args.pair_repeats} alternating calls each, medians; memory as above):")
        for case in cases:
            if (case.n, case.k) in fused_ok:
                print(summary_line(case, paired_times(case, args.pair_repeats), rows))
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
