"""deltakern's AVX512-BF16 GEMM (csrc/cpu/bf16_gemm_avx512.h) and the choice of half-precision GEMM
on CPU (docs/conventions.md §3.4): which GEMM ``auto`` picks, that forcing the kernel where it
cannot run is refused, and every logit the kernel computes against float64 on shapes that cut
its 8-row x 48-class register tiles, its 16-class blocks and its pairs of dimensions anywhere.
The kernel's tests run on CPUs with AVX512-BF16 only (like the GPU tests on GPUs)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from deltakern.ops import extension
from deltakern.ops import registry as ops

needs_ext = pytest.mark.skipif(not extension.available(), reason="needs the compiled CPU ops")
needs_kernel = pytest.mark.skipif(
    not extension.avx512_bf16_usable(), reason="needs a CPU with AVX512-BF16 (and ATen's AVX-512 kernels)"
)


def _has_amx() -> bool:
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


@needs_ext
def test_auto_takes_the_kernel_exactly_where_avx512_bf16_runs_without_amx(monkeypatch):
    monkeypatch.delenv("DELTAKERN_CPU_HALF_GEMM", raising=False)
    chosen = extension.cpu_half_gemm("bfloat16")
    if extension.avx512_bf16_usable() and not _has_amx():
        assert chosen == "avx512_bf16"
    else:
        assert chosen != "avx512_bf16"
    assert extension.cpu_half_gemm("float16") != "avx512_bf16"  # a bfloat16 kernel only
    monkeypatch.setenv("DELTAKERN_CPU_HALF_GEMM", "float32")
    assert extension.cpu_half_gemm("bfloat16") == "float32"


@needs_ext
def test_forcing_the_kernel_without_avx512_is_refused():
    """ATEN_CPU_CAPABILITY=avx2 turns ATen's AVX-512 kernels off, and deltakern's with them: auto
    then converts to float32, and forcing the kernel names what is missing."""
    code = (
        "import torch, deltakern\n"
        "from deltakern.ops import extension, registry\n"
        "assert not extension.avx512_bf16_usable()\n"
        "assert extension.cpu_half_gemm('bfloat16') in ('float32', 'mkl')\n"
        "x, w = torch.randn(5, 8).bfloat16(), torch.randn(3, 8).bfloat16()\n"
        "import os; os.environ['DELTAKERN_CPU_HALF_GEMM'] = 'avx512_bf16'\n"
        "registry.fused_score_state(x, w, 100.0, 1, True)\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    env.pop("DELTAKERN_CPU_HALF_GEMM", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != 0
    assert "DELTAKERN_CPU_HALF_GEMM=avx512_bf16 needs AVX512-BF16" in done.stderr, done.stderr[-2000:]


def _all_logits(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every raw dot product x·wᵀ the op computed, in class order: c = K, no normalisation, scale 1."""
    values, indices, _ = ops.fused_score_state(x, w, 1.0, w.shape[0], False)
    assert bool((indices.sort(dim=1).values == torch.arange(w.shape[0])).all()), "a class is missing or repeated"
    return torch.empty_like(values).scatter_(1, indices, values), indices


def _check_every_logit(x: torch.Tensor, w: torch.Tensor) -> None:
    got, _ = _all_logits(x, w)
    x64, w64 = x.double(), w.double()
    want = x64 @ w64.T
    # Products of bfloat16 values are exact in float32; only the float32 sums round, by at most
    # D * 2^-24 of the sum of |products| (the classical bound, with room for any summation order).
    bound = x.shape[1] * 2.0**-24 * (x64.abs() @ w64.abs().T)
    err = (got.double() - want).abs()
    assert bool((err <= bound).all()), f"largest error {float(err.max()):.3g}, over the bound by {float((err - bound).max()):.3g}"


@needs_kernel
@pytest.mark.parametrize("n", [1, 7, 8, 9, 263])
@pytest.mark.parametrize("k", [1, 15, 16, 17, 47, 48, 49, 1001])
@pytest.mark.parametrize("d", [1, 2, 3, 64, 65])
def test_every_logit_matches_float64(monkeypatch, n, k, d):
    monkeypatch.setenv("DELTAKERN_CPU_HALF_GEMM", "avx512_bf16")
    g = torch.Generator().manual_seed(n * 1000 + k * 10 + d)
    x = (torch.randn(n, d, generator=g) * 3).bfloat16()
    w = torch.randn(k, d, generator=g).bfloat16()
    _check_every_logit(x, w)


@needs_kernel
def test_wide_rows_and_strided_inputs(monkeypatch):
    """D = 511 and 512 (many pairs), x as a view with a row stride wider than its rows, W as a
    transposed view (packed from any layout)."""
    monkeypatch.setenv("DELTAKERN_CPU_HALF_GEMM", "avx512_bf16")
    g = torch.Generator().manual_seed(5)
    for d in (511, 512):
        wide = torch.randn(97, d + 13, generator=g).bfloat16()
        w = torch.randn(d, 130, generator=g).bfloat16().T  # [130, d], column-major
        _check_every_logit(wide[:, 5 : 5 + d], w)


@needs_kernel
def test_the_odd_last_dimension_never_reads_past_its_row(monkeypatch):
    """With D odd the last dimension pairs with zero: the value after each row (here NaN, in the
    same allocation) is never read, or a NaN x 0 would poison the row."""
    monkeypatch.setenv("DELTAKERN_CPU_HALF_GEMM", "avx512_bf16")
    g = torch.Generator().manual_seed(6)
    for d in (1, 3, 65):
        storage = torch.randn(21, d + 1, generator=g).bfloat16()
        storage[:, d] = float("nan")
        w = torch.randn(50, d, generator=g).bfloat16()
        _check_every_logit(storage[:, :d], w)


@needs_kernel
def test_the_kernel_agrees_with_mkl_and_the_float32_conversion(monkeypatch):
    """The three half GEMMs compute the same sums of exact products: their logits differ by
    float32 summation order only, far inside the contract."""
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(300, 512, generator=g).bfloat16(), torch.randn(1000, 512, generator=g).bfloat16()
    logits = {}
    for mode in ("avx512_bf16", "mkl", "float32"):
        monkeypatch.setenv("DELTAKERN_CPU_HALF_GEMM", mode)
        logits[mode], _ = _all_logits(x, w)
    scale = float((x.double().abs() @ w.double().abs().T).max())
    for mode in ("mkl", "float32"):
        assert float((logits["avx512_bf16"] - logits[mode]).abs().max()) <= 512 * 2.0**-24 * scale, mode
