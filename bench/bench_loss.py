"""The fused EBM loss (forward + backward) vs autograd through the plain-PyTorch reference.

Shapes (float32, D = 512): B = 4096 with K = 20,000 classes, and prompt-tuning scale B = 256
with K = 1000; on a GPU also B = 65,536 with K = 20,000. Target on CPU at B = 4096, K = 20,000:
the fused step at most the reference's time and at most a quarter of its peak extra memory.

    python bench/bench_loss.py [--device cpu|cuda] [--out out/bench]

Writes OUT/loss_<device>.json and .csv; prints the table and the ratios.
"""

from __future__ import annotations

import argparse
import sys

import torch

from deltakern import bench as bm
from deltakern.bench import suite as bs

CPU_SHAPES = ((4096, 20_000), (256, 1000))
GPU_SHAPES = CPU_SHAPES + ((65_536, 20_000),)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--shapes", nargs="+", metavar="BxK", help="override the shapes, e.g. 4096x20000 256x1000")
    p.add_argument("--d", type=int, default=512, help="embedding dimension D")
    p.add_argument("--min-time", type=float, default=2.0, help="CPU: seconds of timed calls per provider")
    p.add_argument("--out", default="out/bench", help="output directory")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA GPU")
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes] if args.shapes else (
        GPU_SHAPES if args.device == "cuda" else CPU_SHAPES)
    cases = [bs.loss_case(b, k, args.d, device=args.device) for b, k in shapes]
    if not bs.loss_providers(args.device):
        print(f"no loss providers on {args.device}: {bs.loss_modules_status(args.device)}", file=sys.stderr)
        return 1
    meta = {"command": " ".join(["python", "bench/bench_loss.py"] + (argv if argv is not None else sys.argv[1:])), **bm.environment()}
    options = bs.RunOptions(timing=bm.TimingConfig(min_repeats=3, min_time_s=args.min_time))
    rows = bs.run_suite(cases, options, on_case=bs.results_writer(args.out, f"loss_{args.device}", meta))
    print(bm.format_table(rows))
    for c in bs.compare(rows, "deltakern-fused", "autograd-reference"):
        mem = "-" if c["memory_fraction"] is None else f"{100 * c['memory_fraction']:.1f}%"
        print(f"{c['shape']} {c['device']}: fused fwd+bwd {c['provider_ms']:.1f} ms vs autograd reference "
              f"{c['baseline_ms']:.1f} ms -> {c['speedup']:.2f}x; peak extra memory {mem} of the reference's")
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
