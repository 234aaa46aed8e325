"""The GPU scoring table: the fused Triton kernel vs eager PyTorch, torch.compile of the reference,
a bare torch.mm of the same shape and dtype (the ceiling), the fused kernel alone without
dk.score's checks and derivation (``triton-kernel``), and a plain Triton GEMM with the fused
kernel's own tiles and products writing the logits, no epilogue (``triton-gemm``,
deltakern/ops/triton/gemm.py): the upper bound for what the fused kernel can reach.

``triton.testing.do_bench`` medians on rotated inputs (three copies of X and W cycled, L2 flushed
between calls) at N = 1,000,000, D = 512, K in {10, 1000, 20000}, bfloat16 and float32.
Columns: ms, rows/s, TFLOP/s, % of the measured torch.mm rate, speedup vs eager, peak memory.
Eager needs the full [N, K] float32 logits; where they do not fit it runs over row blocks and
its row says so. Outputs are checked against the reference on 65,536 rows spread over N.
Targets (docs/architecture.md §4) at K = 1000, bf16: >= 60% of torch.mm's rate and >= 8x faster than eager.

    python bench/bench_gpu_score.py [--n 1000000] [--k 10 1000 20000] [--dtype bfloat16 float32]

Writes OUT/gpu_score.json and .csv after every case (a cut-short run keeps its rows).
"""

from __future__ import annotations

import argparse
import sys

import torch

from deltakern import bench as bm
from deltakern.bench import suite as bs
from deltakern.bench.providers import Case

PROVIDERS = ("deltakern-triton", "triton-kernel", "triton-gemm", "eager", "compile-reference", "torch.mm")


def _make_triton_kernel(case: Case):
    """The fused kernel alone (its per-row state), without dk.score's argument checks, row
    scaling and score derivation: the difference to ``deltakern-triton`` is what those cost."""
    from deltakern.bench.providers import TEMPERATURE
    from deltakern.ops.triton.fused_score import fused_score_state

    return lambda x, w: fused_score_state(x, w, inv_temp=1.0 / TEMPERATURE, c=case.c, normalize=True)


def _make_triton_gemm(case: Case):
    """The plain Triton GEMM with the tiles the fused kernel uses for this dtype and c, into one
    reused [rows, K] output buffer (over row blocks when the full logits do not fit)."""
    from deltakern.bench.providers import RowBlocks
    from deltakern.ops.triton import gemm

    def body(x, w):
        if body.buf is None or body.buf.shape[0] < x.shape[0]:
            body.buf = torch.empty((x.shape[0], w.shape[0]), dtype=x.dtype, device=x.device)
        return gemm.logits(x, w, c=case.c, out=body.buf[: x.shape[0]])

    body.buf = None
    return RowBlocks(body, combine=lambda parts: parts[-1], note="same tiles as deltakern-triton; one output buffer")


def providers() -> dict[str, dict]:
    """The score suite's CUDA providers plus the Triton GEMM baseline."""
    from deltakern.bench.providers import Provider, score_providers

    chosen = score_providers("cuda")
    chosen["triton-kernel"] = Provider("triton-kernel", "ceiling", _make_triton_kernel, checked=False)
    chosen["triton-gemm"] = Provider("triton-gemm", "ceiling", _make_triton_gemm, checked=False)
    return {"score": chosen}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="rows N")
    p.add_argument("--k", type=int, nargs="+", default=[10, 1000, 20_000], help="classes K")
    p.add_argument("--d", type=int, default=512, help="embedding dimension D")
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=("bfloat16", "float16", "float32"))
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), help="providers to time")
    p.add_argument("--check-rows", type=int, default=65_536, help="rows (spread over N) checked against the reference")
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench repetition budget per provider (ms)")
    p.add_argument("--out", default="out/bench", help="output directory")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (torch.cuda.is_available() is False)")
    cases = [bs.score_case(args.n, k, args.d, 1, dt, "cuda") for dt in args.dtype for k in args.k]
    options = bs.RunOptions(
        timing=bm.TimingConfig(gpu_warmup_ms=25, gpu_rep_ms=args.rep_ms),
        providers=args.providers, check_rows=args.check_rows, rotations=3,
    )
    meta = {"command": " ".join(["python", "bench/bench_gpu_score.py"] + (argv if argv is not None else sys.argv[1:])), **bm.environment()}
    rows = bs.run_suite(cases, options, providers=providers(), on_case=bs.results_writer(args.out, "gpu_score", meta))
    print(bm.format_table(rows))
    for c in bs.compare(rows, "deltakern-triton", "eager"):
        print(f"{c['shape']} {c['dtype']}: triton {c['provider_ms']:.2f} ms, {c['speedup']:.1f}x faster than eager")
    for c in bs.compare(rows, "deltakern-triton", "triton-gemm"):
        print(f"{c['shape']} {c['dtype']}: fused at {100 * c['speedup']:.0f}% of the Triton GEMM's rate (same tiles)")
    for c in bs.compare(rows, "deltakern-triton", "triton-kernel"):
        print(f"{c['shape']} {c['dtype']}: dk.score at {100 * c['speedup']:.0f}% of its kernel alone's rate")
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
