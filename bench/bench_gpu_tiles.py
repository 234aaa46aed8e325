"""Tile sweep of the fused Triton scoring kernel on a GPU: which BLOCK_M x BLOCK_N x BLOCK_K,
warps and stages run fastest, beside torch.mm and the plain Triton GEMM with the same tiles.

For each dtype and c, every candidate tile config (the autotuning candidates of
deltakern/ops/triton/fused_score.py plus wider and deeper ones) is compiled, launched on
N x D rows against K classes, checked against a float64 reference on 16,384 rows spread over N,
and timed with ``triton.testing.do_bench`` (median). The check compares the top-c logits and
the log-sum-exp of the other logits (the kernel's outputs) with the reference. X is several times the L2, so no rotation
is needed. Registers and spills come from the compiled kernel. The row marked ``*`` is the
config ``select_config`` picks today.

    python bench/bench_gpu_tiles.py [--n 1000000] [--k 1000] [--dtype bfloat16 float32] [--c 1 5]

Writes OUT/gpu_tiles.json (after every row, so a cut-short run keeps what it measured) and
prints one table per (dtype, c). Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

# Beyond the autotuning candidates: wider class tiles, deeper pipelines and one warpgroup per
# 128 rows (two programs per SM), the shapes Hopper GEMMs usually favour.
EXTRA_TILES = (
    (128, 128, 64, 8, 4), (128, 128, 64, 4, 3), (128, 256, 64, 8, 3), (64, 256, 64, 4, 3),
    (256, 128, 64, 8, 3), (128, 128, 128, 8, 2), (64, 128, 64, 4, 4), (128, 128, 32, 8, 3),
)


def candidates(dtype: torch.dtype) -> list:
    from deltakern.ops.triton.fused_score import AUTOTUNE_TILES, TileConfig, autotune_tiles

    tiles = list(AUTOTUNE_TILES) + [TileConfig(*t) for t in EXTRA_TILES]
    if dtype == torch.float32:  # 3xTF32 products: the float32 candidates and the 32-wide K slices
        keep = set(autotune_tiles(True))
        tiles = [t for t in tiles if t in keep or t.block_k == 32]
    return list(dict.fromkeys(tiles))


def reference(x: torch.Tensor, w: torch.Tensor, inv_temp: float, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 top-c cosine logits of the rows ``x`` (already the checked subset) and the
    log-sum-exp of the other K - c logits, the kernel's two value outputs."""
    xn = torch.nn.functional.normalize(x.double(), dim=1)
    wn = torch.nn.functional.normalize(w.double(), dim=1)
    ordered = (xn @ wn.T * inv_temp).sort(dim=1, descending=True).values
    return ordered[:, :c], torch.logsumexp(ordered[:, c:], dim=1)


def sweep_one(x, w, c: int, inv_temp: float, config, check_rows: torch.Tensor, ref, rep_ms: float,
              logits: torch.Tensor) -> dict:
    """One config: compile, check, time the fused kernel, then the plain GEMM of the same tiles
    writing into ``logits`` [N, K]."""
    import triton

    from deltakern.ops.triton import fused_score, gemm

    n, k = x.shape[0], w.shape[0]
    args, meta, _ = fused_score.kernel_arguments(x, w, inv_temp, c, True, False)
    launch = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    grid = (triton.cdiv(n, config.block_m),)
    row = dict(tiles=f"{config.block_m}x{config.block_n}x{config.block_k} w{config.num_warps} s{config.num_stages}")
    began = time.perf_counter()
    try:
        for out in (args[3], args[5]):
            out.fill_(float("nan"))  # poisoned: every checked value must have been written
        compiled = fused_score._fused_score_kernel[grid](*args, **meta, **launch)
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - a config that does not compile or launch is a result
        return dict(row, status=f"error: {type(exc).__name__}: {str(exc)[:160]}")
    row["compile_s"] = round(time.perf_counter() - began, 1)
    row["registers"] = getattr(compiled, "n_regs", None)
    row["spills"] = getattr(compiled, "n_spills", None)
    shared = getattr(getattr(compiled, "metadata", None), "shared", None)
    row["shared_kb"] = None if shared is None else round(shared / 1024, 1)
    top_v, lse = args[3][check_rows].double(), args[5][check_rows].double()
    errors = torch.cat([(top_v - ref[0]).abs().flatten(), (lse - ref[1]).abs()])
    err = math.nan if bool(errors.isnan().any()) else errors.max().item()  # NaN: an output not written
    row["max_abs_err"] = err
    row["status"] = "ok" if math.isfinite(err) else "NOT WRITTEN / NaN"
    row["ms"] = triton.testing.do_bench(lambda: fused_score._fused_score_kernel[grid](*args, **meta, **launch),
                                        rep=rep_ms, return_mode="median")
    gargs, gmeta = gemm.kernel_arguments(x, w, logits)
    ggrid = (triton.cdiv(n, config.block_m), triton.cdiv(k, config.block_n))
    try:
        row["gemm_ms"] = triton.testing.do_bench(lambda: gemm._gemm_kernel[ggrid](*gargs, **gmeta, **launch),
                                                 rep=rep_ms, return_mode="median")
    except Exception as exc:  # noqa: BLE001
        row["gemm_ms"] = None
        row["gemm_status"] = f"error: {type(exc).__name__}"
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="rows N")
    p.add_argument("--k", type=int, default=1000, help="classes K")
    p.add_argument("--d", type=int, default=512, help="embedding dimension D")
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=("bfloat16", "float16", "float32"))
    p.add_argument("--c", type=int, nargs="+", default=[1], help="top-c sizes")
    p.add_argument("--rep-ms", type=float, default=150.0, help="do_bench repetition budget per timing (ms)")
    p.add_argument("--out", default="out/bench", help="output directory")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu_tiles: needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    from deltakern.ops.triton.fused_score import select_config

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    inv_temp = 100.0
    flop = 2.0 * args.n * args.k * args.d
    rows: list[dict] = []
    meta = dict(gpu=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
                n=args.n, k=args.k, d=args.d, inv_temp=inv_temp)
    check_rows = torch.linspace(0, args.n - 1, 16_384, device=device).long()
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        x = torch.randn(args.n, args.d, device=device, generator=gen).to(dtype)
        w = torch.randn(args.k, args.d, device=device, generator=gen).to(dtype)
        logits = torch.empty((args.n, args.k), dtype=dtype, device=device)  # the GEMM's output, reused
        mm_ms = triton.testing.do_bench(lambda x=x, w=w: torch.mm(x, w.T), rep=args.rep_ms, return_mode="median")
        for c in args.c:
            ref = reference(x[check_rows], w, inv_temp, c)
            picked = select_config(device, dtype, c)
            table = []
            for config in candidates(dtype):
                row = dict(meta, dtype=dtype_name, c=c, torch_mm_ms=mm_ms, picked=config == picked,
                           **sweep_one(x, w, c, inv_temp, config, check_rows, ref, args.rep_ms, logits))
                if "ms" in row:
                    row["tflops"] = flop / row["ms"] / 1e9
                    row["pct_of_torch_mm"] = 100.0 * mm_ms / row["ms"]
                rows.append(row)
                table.append(row)
                (out_dir / "gpu_tiles.json").write_text(json.dumps(rows, indent=1))
                print(f"  {dtype_name} c={c} {row['tiles']}: {row.get('ms', float('nan')):.3f} ms {row['status']}",
                      flush=True)
            print(f"\n{meta['gpu']}, N={args.n} K={args.k} D={args.d}, {dtype_name}, c={c}: "
                  f"torch.mm {mm_ms:.3f} ms ({flop / mm_ms / 1e9:.0f} TFLOP/s)")
            print(f"{'tiles':<22}{'ms':>8}{'TFLOP/s':>9}{'% mm':>7}{'gemm ms':>9}{'regs':>6}{'spill':>6}"
                  f"{'smem KB':>8}{'err':>10}  status")
            for row in sorted(table, key=lambda r: r.get("ms", math.inf)):
                mark = "*" if row["picked"] else " "
                if "ms" not in row:
                    print(f"{mark}{row['tiles']:<21}{'-':>8}  {row['status']}")
                    continue
                gms = row.get("gemm_ms")
                print(f"{mark}{row['tiles']:<21}{row['ms']:>8.3f}{row['tflops']:>9.0f}{row['pct_of_torch_mm']:>7.0f}"
                      f"{(f'{gms:.3f}' if gms else '-'):>9}{row['registers'] or '-':>6}{row['spills'] or 0:>6}"
                      f"{row['shared_kb'] or '-':>8}{row['max_abs_err']:>10.2e}  {row['status']}")
        x = w = logits = None  # free before the next dtype's inputs
        torch.cuda.empty_cache()
    print(f"rows -> {out_dir / 'gpu_tiles.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
