"""Fused C++ CPU scoring against plain PyTorch and against the bare GEMM it is built on.

Two modes:

``python bench/bench_cpu_score.py [--n 200000 --k 1000 --d 512] [--compile] [--out out/bench]``
    The foundation target of docs/architecture.md §5: ``deltakern-cpp`` vs eager vs the reference
    (and the bare ``torch.mm``), each checked against the reference first, with peak extra memory.
    Writes OUT/cpu_score.json and .csv.

``python bench/bench_cpu_score.py --targets [--rounds 5] [--small-rounds 15] [--out out/bench]``
    The targets of issue 16, measured side by side in one run with the calls interleaved round by
    round (so load on a shared machine hits every provider alike); medians over the rounds, and the
    paired ratio (the median over rounds of each round's time over the baseline's in that round):

    - N = 200,000, D = 512, K = 1000: float32 ``X @ Wᵀ``, bfloat16 ``X @ Wᵀ`` (bfloat16 output, as
      PyTorch computes it), bfloat16 inputs with float32 output (MKL's ``cblas_gemm_bf16bf16f32``,
      which the op uses on CPUs with AMX, when torch's MKL exports it; on CPUs with AVX512-BF16
      and no AMX the op uses deltakern's own kernel, named in the header), the compiled op
      alone and ``dk.score(backend="cpp")`` with float32 and with bfloat16 inputs, and with float32
      inputs at ``matmul_precision="medium"`` (bf16 products where the CPU has native bf16);
    - K in {10, 100} at N in {10,000, 4096}, float32: ``dk.score`` cpp against eager PyTorch.

    Before timing, every scorer's values are compared with a float64 evaluation on the first rows
    (the worst error is printed as a multiple of the contract's tolerance, docs/conventions.md §3;
    for ``matmul_precision="medium"``, which is outside the contract, as a multiple of its own
    bound, the largest move of a logit that bf16 rounding allows, §3.4).
    Prints the machine (CPU model and its matrix-relevant instruction flags) and a table of medians
    and ratios; writes OUT/cpu_score_targets.json.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import deltakern as dk
from deltakern import bench as bm
from deltakern.bench import suite as bs
from deltakern.bench.providers import eager_scores, make_inputs, score_case
from deltakern.core.constants import score_tolerance
from deltakern.data import atomic
from deltakern.ops import extension

TEMPERATURE = 0.01
# The instruction-set extensions that decide which GEMM kernels oneDNN/MKL can use.
MATRIX_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni",
                "amx_tile", "amx_bf16", "amx_fp16")
CHECK_ROWS = 2000


def machine() -> dict:
    """The CPU model, thread count and the matrix-relevant flags, as torch's cpuinfo sees them."""
    probe = getattr(torch._C._cpu, "_get_cpu_capability", None)  # cpuinfo's flags (torch >= 2.9)
    caps = probe() if probe is not None else {}
    flags = [f for f in MATRIX_FLAGS if caps.get("fma3" if f == "fma" else f)]
    return {"cpu": bm.cpu_name(), "threads": torch.get_num_threads(), "flags": flags,
            "aten_capability": torch.backends.cpu.get_cpu_capability(),
            "half_gemm": {t: extension.cpu_half_gemm(t) for t in ("bfloat16", "float16")},
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def _mkl_bf16_gemm() -> Callable | None:
    """``C = A @ Bᵀ`` for bfloat16 A, B with a float32 C through MKL, or None when torch's MKL
    does not export ``cblas_gemm_bf16bf16f32``."""
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        fn = lib.cblas_gemm_bf16bf16f32
    except (OSError, AttributeError):
        return None
    fn.restype = None
    fn.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                        ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int]

    def gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        m, k = a.shape
        n = b.shape[0]
        # 101 = row-major, 111 = no transpose, 112 = transpose.
        fn(101, 111, 112, m, n, k, 1.0, a.data_ptr(), k, b.data_ptr(), k, 0.0, out.data_ptr(), n)
        return out

    return gemm


def scored_and_float64(X: torch.Tensor, W: torch.Tensor, scorer: Callable) -> tuple[dk.Scores, dk.Scores]:
    """``scorer``'s scores of the first rows and the float64 reference's of the same input values."""
    x = X[:CHECK_ROWS]
    return scorer(x, W), dk.score(x.double(), W.double(), temperature=TEMPERATURE, backend="reference")


def worst_error(X: torch.Tensor, W: torch.Tensor, scorer: Callable) -> float:
    """Worst |error| of delta_energy, energy, max_logit and msp on the first rows, as a multiple
    of the contract's bound max(tol·|e|, tol) against float64 on the same input values."""
    got, want = scored_and_float64(X, W, scorer)
    tol = score_tolerance(str(X.dtype).removeprefix("torch."))
    worst = 0.0
    for name in ("delta_energy", "energy", "max_logit", "msp"):
        e, a = getattr(want, name), getattr(got, name).double()
        worst = max(worst, float(((a - e).abs() / (e.abs() * tol).clamp(min=tol)).max()))
    return worst


def medium_error(X: torch.Tensor, W: torch.Tensor, scorer: Callable) -> float:
    """Worst |error| of max_logit and energy on the first rows as a multiple of the bound of
    ``matmul_precision="medium"`` (docs/conventions.md §3.4): a cosine moves by at most 2u + u²
    (u = 2⁻⁸, bfloat16's unit roundoff), a logit by that over the temperature, and so does each
    log-sum-exp."""
    got, want = scored_and_float64(X, W, scorer)
    u = 2.0**-8
    bound = (2 * u + u * u) / TEMPERATURE
    return max(float((getattr(got, f).double() - getattr(want, f)).abs().max()) / bound for f in ("max_logit", "energy"))


def interleaved(calls: dict[str, Callable], rounds: int) -> dict[str, list[float]]:
    """Times (ms) of every call, one call of each per round, in rotating order."""
    names = list(calls)
    for name in names:  # warm-up: first calls allocate and pick kernels
        calls[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            calls[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def paired_ratio(times: list[float], baseline: list[float]) -> float:
    """Median over the rounds of each round's time over the baseline's time in the same round.

    Both calls of a round run seconds apart, so load that drifts over minutes (this project's
    CI-class VMs show ~25% steal time) moves both alike and cancels in the ratio, which the ratio
    of the two medians does not do when the drift hits their middle rounds differently.
    """
    return statistics.median(t / b for t, b in zip(times, baseline, strict=True))


def _op(x, w):
    return torch.ops.deltakern.fused_score_state(x, w, 1.0 / TEMPERATURE, 1, True)


def large_shape(args, record: Callable) -> None:
    """The GEMMs and the op in float32 and bfloat16 at the large shape."""
    n, k, d = args.n, args.k, args.d
    X, W = make_inputs(score_case(n, k, d), 1)[0]
    Xb, Wb = X.bfloat16(), W.bfloat16()
    out32 = torch.empty(n, k)
    out16 = torch.empty(n, k, dtype=torch.bfloat16)
    calls = {
        "float32 X @ W.T": lambda: torch.mm(X, W.T, out=out32),
        "bfloat16 X @ W.T": lambda: torch.mm(Xb, Wb.T, out=out16),
    }
    mkl = _mkl_bf16_gemm()
    if mkl is not None:
        calls["bfloat16 X @ W.T -> float32 (MKL)"] = lambda: mkl(Xb, Wb, out32)
    calls.update({
        "op fused_score_state, float32": lambda: _op(X, W),
        "op fused_score_state, bfloat16": lambda: _op(Xb, Wb),
        "dk.score cpp, float32": lambda: dk.score(X, W, temperature=TEMPERATURE, backend="cpp"),
        "dk.score cpp, bfloat16": lambda: dk.score(Xb, Wb, temperature=TEMPERATURE, backend="cpp"),
        # float32 inputs with bf16 products: the bfloat16 GEMM where the CPU has native bf16, the
        # float32 GEMM elsewhere (docs/conventions.md §3.4).
        "dk.score cpp, float32, medium": lambda: dk.score(X, W, temperature=TEMPERATURE, backend="cpp",
                                                          matmul_precision="medium"),
    })
    cpp = lambda a, b: dk.score(a, b, temperature=TEMPERATURE, backend="cpp")  # noqa: E731
    medium = lambda a, b: dk.score(a, b, temperature=TEMPERATURE, backend="cpp", matmul_precision="medium")  # noqa: E731
    errors = {"dk.score cpp, float32": worst_error(X, W, cpp), "dk.score cpp, bfloat16": worst_error(Xb, Wb, cpp),
              "dk.score cpp, float32, medium": medium_error(X, W, medium)}
    print(f"N={n} K={k} D={d}, {args.rounds} interleaved rounds:")
    times = interleaved(calls, args.rounds)
    rows = record(f"N={n} K={k} D={d}", times, "float32 X @ W.T", errors)
    med = {name: row["median_ms"] for name, row in rows.items()}
    f32 = rows["dk.score cpp, float32"]
    print(f"  dk.score cpp float32 / float32 GEMM: {f32['vs_baseline']:.2f}x, "
          f"paired {f32['paired_vs_baseline']:.2f}x (target <= 1.10)")
    print(f"  dk.score cpp bfloat16 / bfloat16 GEMM: {med['dk.score cpp, bfloat16'] / med['bfloat16 X @ W.T']:.2f}x "
          "(target <= 1.35)")
    print(f"  dk.score cpp float32 / bfloat16: {med['dk.score cpp, float32'] / med['dk.score cpp, bfloat16']:.2f}x "
          "(target >= 1.6 on a CPU with native bf16)")
    print(f"  dk.score cpp float32 highest / medium: "
          f"{med['dk.score cpp, float32'] / med['dk.score cpp, float32, medium']:.2f}x")


def targets(args) -> int:
    info = machine()
    print(f"machine: {info['cpu']}, {info['threads']} threads, flags: {' '.join(info['flags'])}, "
          f"ATen capability {info['aten_capability']}, load average {info['load_average']}")
    print(f"half-precision GEMM of the op: bfloat16 -> {info['half_gemm']['bfloat16']}, "
          f"float16 -> {info['half_gemm']['float16']}")
    results: list[dict] = []

    def record(group: str, times: dict[str, list[float]], baseline: str, errors: dict[str, float]) -> dict[str, dict]:
        """Prints and keeps one row per call; returns them by call name."""
        base = statistics.median(times[baseline])
        rows = {}
        for name, t in times.items():
            med = statistics.median(t)
            row = {"group": group, "call": name, "median_ms": med, "min_ms": min(t), "rounds": len(t),
                   "vs_baseline": med / base, "paired_vs_baseline": paired_ratio(t, times[baseline]),
                   "baseline": baseline, "error_vs_bound": errors.get(name)}
            results.append(row)
            rows[name] = row
            kind = "medium's bound" if name.endswith("medium") else "bound"
            err = "" if row["error_vs_bound"] is None else f"  worst error {row['error_vs_bound']:.3f}x {kind}"
            print(f"  {name:<36} {med:10.1f} ms (min {min(t):7.1f})  time {row['vs_baseline']:5.2f}x {baseline}'s"
                  f" (paired {row['paired_vs_baseline']:5.2f}x){err}")
        return rows

    large_shape(args, record)
    d = args.d
    cpp = lambda a, b: dk.score(a, b, temperature=TEMPERATURE, backend="cpp")  # noqa: E731
    # --- small K: the op's fixed costs against eager PyTorch
    for n_small in (10_000, 4096):
        for k_small in (10, 100):
            X, W = make_inputs(score_case(n_small, k_small, d), 1)[0]
            calls = {
                "eager": lambda X=X, W=W: eager_scores(X, W),
                "dk.score cpp": lambda X=X, W=W: cpp(X, W),
                "op fused_score_state": lambda X=X, W=W: _op(X, W),
            }
            group = f"N={n_small} K={k_small} D={d}"
            print(f"{group}, {args.small_rounds} interleaved rounds:")
            record(group, interleaved(calls, args.small_rounds), "eager", {"dk.score cpp": worst_error(X, W, cpp)})

    out = Path(args.out)
    meta = {"command": "python bench/bench_cpu_score.py " + " ".join(sys.argv[1:]), "machine": info, **bm.environment()}
    path = atomic.write_json(out / "cpu_score_targets.json", {"meta": meta, "rows": results}, indent=1)
    print(f"wrote {path}")
    return 0


def suite(args, argv: list[str] | None) -> int:
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000, help="rows N")
    p.add_argument("--k", type=int, default=1000, help="classes K")
    p.add_argument("--d", type=int, default=512, help="embedding dimension D")
    p.add_argument("--targets", action="store_true", help="issue 16's side-by-side table (GEMMs, bf16, small K)")
    p.add_argument("--rounds", type=int, default=5, help="--targets: interleaved rounds at the large shape")
    p.add_argument("--small-rounds", type=int, default=15, help="--targets: interleaved rounds at small K")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the reference (compiles first)")
    p.add_argument("--min-time", type=float, default=3.0, help="seconds of timed calls per provider (at least 3 calls)")
    p.add_argument("--out", default="out/bench", help="output directory")
    args = p.parse_args(argv)
    return targets(args) if args.targets else suite(args, argv)


if __name__ == "__main__":
    sys.exit(main())
