"""``matmul_precision`` (docs/conventions.md §3.4) on CPU: "highest" is the float32 path bit for
bit; "high"/"medium" multiply float32 inputs in bfloat16 where the CPU has native bf16 (forced
here with DELTAKERN_CPU_HALF_GEMM=mkl, which MKL also runs without the instructions, and =avx512_bf16
on CPUs with AVX512-BF16) within the Cauchy–Schwarz bound of bf16 rounding, and stay on the exact
float32 GEMM elsewhere (forced with DELTAKERN_CPU_HALF_GEMM=float32, and what "auto" does on a CPU
without native bf16). The
deprecated ``allow_tf32`` maps onto it with a FutureWarning. The TF32 side is measured on a GPU
in tests/test_triton_gpu.py."""

from __future__ import annotations

import pytest
import torch
from _half_gemms import bf16_gemms
from oracle import neglabel64, scores64

import deltakern as dk
from deltakern.ops import extension, registry

needs_cpp = pytest.mark.skipif(
    not extension.available() or not registry.has_kernel("fused_score_neg_state", "CPU"),
    reason="needs the compiled CPU ops",
)
FIELDS = ("delta_energy", "energy", "max_logit", "msp", "topk_values", "topk_indices", "neglabel")
U_BF16 = 2.0**-8  # unit roundoff of bfloat16
COSINE_BOUND = 2 * U_BF16 + U_BF16**2  # |cos(x̃, w̃) − cos(x, w)| for unit rows rounded elementwise


def inputs(n=300, k=40, m=60, d=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(k, d, generator=g), torch.randn(m, d, generator=g)


def scores(X, W, N, **kwargs):
    s = dk.score(X, W, c=2, negatives=N, negative_groups=3, backend="cpp", **kwargs)
    return {f: getattr(s, f) for f in FIELDS}


@needs_cpp
@pytest.mark.parametrize("setting", ["high", "medium"])
def test_float32_gemm_where_bf16_is_not_native(monkeypatch, setting):
    X, W, N = inputs()
    want = scores(X, W, N)
    modes = ["float32"] + (["auto"] if extension.cpu_half_gemm("bfloat16") == "float32" else [])
    for mode in modes:
        monkeypatch.setenv("DELTAKERN_CPU_HALF_GEMM", mode)
        got = scores(X, W, N, matmul_precision=setting)
        for field in FIELDS:
            assert torch.equal(got[field], want[field]), (mode, field)


@needs_cpp
@pytest.mark.parametrize("gemm", bf16_gemms())
@pytest.mark.parametrize("setting", ["high", "medium"])
def test_bf16_products_within_the_rounding_bound(monkeypatch, setting, gemm):
    X, W, N = inputs(seed=1)
    monkeypatch.setenv("DELTAKERN_CPU_HALF_GEMM", gemm)
    got = scores(X, W, N, matmul_precision=setting)
    highest = scores(X, W, N, matmul_precision="highest")
    want = scores64(X, W, temperature=0.01, c=2)
    assert not torch.equal(got["max_logit"], highest["max_logit"]), "the bfloat16 GEMM was not used"
    bound = COSINE_BOUND / 0.01  # in logits at τ = 0.01
    for field in ("max_logit", "energy"):
        assert float((got[field].double() - want[field]).abs().max()) <= bound, field
    # Every logit moves by at most `bound`, so each log-sum-exp does, and the log share (softplus
    # of their differences, 1-Lipschitz) by at most twice that.
    want_neglabel = neglabel64(X, W, N, temperature=0.01, groups=3)
    assert float((got["neglabel"].double() - want_neglabel).abs().max()) <= 2 * bound


@needs_cpp
@pytest.mark.parametrize("gemm", bf16_gemms())
def test_rows_outside_the_half_range_take_the_float32_gemm(monkeypatch, gemm):
    """A chunk holding a row too tiny for the bfloat16 GEMM's safe range is multiplied in float32,
    so it keeps the float32 contract (one thread: the 20 rows are one chunk)."""
    X, W, N = inputs(n=20, seed=3)
    X[4] *= 1e-12
    monkeypatch.setenv("DELTAKERN_CPU_HALF_GEMM", gemm)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = scores(X, W, N, matmul_precision="medium")
        want = scores(X, W, N, matmul_precision="highest")
    finally:
        torch.set_num_threads(threads)
    for field in FIELDS:
        assert torch.equal(got[field], want[field]), field


@needs_cpp
@pytest.mark.parametrize("gemm", bf16_gemms())
def test_half_and_float64_inputs_ignore_the_setting(monkeypatch, gemm):
    monkeypatch.setenv("DELTAKERN_CPU_HALF_GEMM", gemm)
    X, W, N = inputs(seed=2)
    for dtype in (torch.bfloat16, torch.float64):
        x, w, n = X.to(dtype), W.to(dtype), N.to(dtype)
        a, b = scores(x, w, n), scores(x, w, n, matmul_precision="medium")
        for field in FIELDS:
            assert torch.equal(a[field], b[field]), (dtype, field)


def test_allow_tf32_is_deprecated_and_maps_onto_matmul_precision():
    X, W, _ = inputs(n=5, k=4, d=8)
    with pytest.warns(FutureWarning, match=r"allow_tf32 is deprecated.*matmul_precision='high'"):
        a = dk.score(X, W, allow_tf32=True, backend="reference")
    with pytest.warns(FutureWarning, match=r"matmul_precision='highest'"):
        dk.score_modes(X, W, allow_tf32=False, backend="reference")
    assert torch.equal(a.energy, dk.score(X, W, matmul_precision="high", backend="reference").energy)
    with pytest.raises(ValueError, match="allow_tf32=False contradicts matmul_precision='medium'"):
        with pytest.warns(FutureWarning):
            dk.score(X, W, allow_tf32=False, matmul_precision="medium")
    with pytest.raises(TypeError, match="allow_tf32 must be a bool"):
        dk.score(X, W, allow_tf32=1)
    with pytest.raises(ValueError, match="matmul_precision must be one of 'highest', 'high', 'medium', got 'low'"):
        dk.score(X, W, matmul_precision="low")
