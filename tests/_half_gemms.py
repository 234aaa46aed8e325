"""The half-precision GEMMs the CPU ops can be forced onto with DELTAKERN_CPU_HALF_GEMM
(docs/conventions.md §3.4): MKL's mixed GEMM (which MKL runs on any x86 CPU, natively or not), the
float32 conversion, and, on CPUs with AVX512-BF16, deltakern's own bfloat16 kernel."""

from __future__ import annotations

from deltakern.ops import extension


def half_gemms() -> list[str]:
    """Every DELTAKERN_CPU_HALF_GEMM value that forces a GEMM this machine can run."""
    return ["mkl", "float32"] + (["avx512_bf16"] if extension.avx512_bf16_usable() else [])


def bf16_gemms() -> list[str]:
    """The forced values that multiply in bfloat16 (all but the float32 conversion)."""
    return [mode for mode in half_gemms() if mode != "float32"]
