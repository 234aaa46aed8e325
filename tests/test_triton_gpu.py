"""The compiled Triton scoring kernel on a CUDA device (marked gpu; skipped without CUDA).

Same contract as test_triton.py (which runs the kernel under the interpreter on CPU), plus
what only the GPU shows: tensor-core products in every dtype, 3xTF32 vs plain TF32, int64
offsets on inputs past 2^31 elements, memory that stays O(N), torch.compile and autotuning.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from oracle import (  # noqa: E402
    assert_close_contract,
    assert_indices_match,
    confident_rows,
    logits64,
    neglabel64,
    scores64,
)

import deltakern as dk  # noqa: E402
from deltakern.ops.triton import interpreter_active  # noqa: E402
from deltakern.reference import scoring as reference  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(interpreter_active(), reason="needs compiled Triton (TRITON_INTERPRET is set)"),
]

SCORE_FIELDS = ("delta_energy", "delta_energy_terms", "energy", "max_logit", "msp", "topk_values")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def fused():
    from deltakern.ops.triton import fused_score

    return fused_score


def make_inputs(n, k, d, seed, dtype=torch.float32, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g) * (0.5 + torch.rand(n, 1, generator=g))
    W = torch.randn(k, d, generator=g) * (0.5 + torch.rand(k, 1, generator=g))
    return X.to(device=device, dtype=dtype), W.to(device=device, dtype=dtype)


def check_scores(X, W, *, temperature, c, reset, dtype, normalize=True):
    got = dk.score_modes(X, W, temperature=temperature, c=c, reset=reset, normalize=normalize, backend="triton")
    for mode, scores in got.items():
        assert scores.delta_energy.device.type == "cuda"
        want = scores64(X, W, temperature=temperature, c=c, reset=reset, mode=mode, normalize=normalize)
        for field in SCORE_FIELDS:
            assert_close_contract(getattr(scores, field), want[field], dtype, f"{dtype}/{mode}/{field}")
        assert_indices_match(scores.topk_indices, want["topk_indices"], want["logits"], dtype)
    return got


MATRIX = [
    (1, 1, 16, 1), (5, 3, 48, 3), (130, 3, 96, 3), (1, 70, 48, 1), (130, 70, 96, 1), (130, 70, 48, 3),
    (5, 70, 16, 16), (130, 257, 16, 1), (5, 257, 48, 3), (130, 257, 96, 16),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,d,c", MATRIX)
def test_small_odd_shapes(n, k, d, c, dtype):
    X, W = make_inputs(n, k, d, seed=n + 3 * k + d + c, dtype=dtype)
    for temperature, reset in ((0.01, 0.0), (1.0, -0.3)):
        check_scores(X, W, temperature=temperature, c=c, reset=reset, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [1, 5, 16])
def test_clip_like_shape(dtype, c):
    X, W = make_inputs(4099, 1001, 512, seed=c, dtype=dtype)
    check_scores(X, W, temperature=0.01, c=c, reset=0.05, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unnormalised_and_strided(dtype):
    base, W = make_inputs(2 * 1031, 301, 520, seed=9, dtype=dtype)
    base, W = base / 512**0.5, W / 512**0.5  # unnormalised logits of order one at τ = 1
    X = base[::2, :512]  # a row stride and a narrower D: read in place, no copy
    check_scores(X, W[:, :512], temperature=1.0, c=3, reset=0.2, dtype=dtype, normalize=False)
    check_scores(base[:1031, ::2], W[:, ::2], temperature=0.01, c=3, reset=0.0, dtype=dtype)  # copied


@pytest.mark.parametrize("c", [1, 3])
def test_confident_rows_float32(c):
    X, W = confident_rows(1000, 1000, 512, seed=c)
    X, W = X.cuda(), W.cuda()
    assert bool((scores64(X, W, temperature=0.01)["msp"] > 1 - 1e-12).all())
    for reset in (0.0, -0.9):
        check_scores(X, W, temperature=0.01, c=c, reset=reset, dtype=torch.float32)


def test_reduced_matmul_precision_error_is_bounded_and_reported():
    """3xTF32 (default) meets the float32 contract; plain TF32 rounds each input to 10 mantissa
    bits, so a unit-vector cosine moves by at most ~2·2^-11 ≈ 1e-3 (Cauchy-Schwarz). The
    measured errors are printed for the README."""
    X, W = make_inputs(8192, 1000, 512, seed=77)
    want = scores64(X, W, temperature=0.01, c=1, reset=0.0)
    measured = {}
    for reduced in (False, True):
        got = dk.score(X, W, temperature=0.01, c=1, backend="triton", matmul_precision="high" if reduced else "highest")
        measured[reduced] = {
            field: float((getattr(got, field).double() - want[field]).abs().max())
            for field in ("max_logit", "energy", "delta_energy", "msp")
        }
    print(f"max abs error at tau=0.01, D=512: 3xTF32 {measured[False]}, TF32 {measured[True]}")
    default = dk.score(X, W, temperature=0.01, c=1, backend="triton")
    for field in SCORE_FIELDS:
        assert_close_contract(getattr(default, field), want[field], torch.float32, field)
    assert measured[True]["max_logit"] * 0.01 <= 1.1e-3  # in cosine units
    assert measured[True]["energy"] * 0.01 <= 1.1e-3


@pytest.mark.slow  # heavy: opt-in in bench/gpu_check.sh (GPU_CHECK_HEAVY=1)
def test_rows_times_classes_beyond_int32(fused):
    """N·K > 2^31 (N = 2.2M, K = 1000) with a cheap D: against the chunked reference."""
    n, k, d = 2_200_000, 1000, 16
    X, W = make_inputs(n, k, d, seed=5, dtype=torch.bfloat16)
    assert n * k > 2**31
    got_v, got_i, got_lse = fused.fused_score_state(X, W, inv_temp=100.0, c=3, normalize=True)
    want_v, want_i, want_lse = reference.score_state(X, W, temperature=0.01, c=3, normalize=True)
    assert_close_contract(got_v, want_v, torch.bfloat16, "topk_values")
    assert_close_contract(got_lse, want_lse, torch.bfloat16, "lse_outside")
    rows = (got_i != want_i).any(dim=1).nonzero().flatten()[:2000]
    if rows.numel():  # near-ties only, checked against float64 logits of those rows
        assert_indices_match(got_i[rows], want_i[rows], logits64(X[rows], W, 0.01), torch.bfloat16)


@pytest.mark.slow  # heavy: opt-in in bench/gpu_check.sh (GPU_CHECK_HEAVY=1)
def test_row_offsets_beyond_int32(fused):
    """N·D > 2^31 elements of X: rows past the int32 range are read at the right address."""
    d, k = 64, 7
    n = 2**31 // d + 4096
    g = torch.Generator(device="cuda").manual_seed(3)
    X = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    W = torch.randn(k, d, device="cuda", dtype=torch.bfloat16, generator=g)
    got_v, got_i, got_lse = fused.fused_score_state(X, W, inv_temp=100.0, c=3, normalize=True)
    for rows in (slice(0, 4096), slice(n - 8192, n)):
        want = scores64(X[rows], W, temperature=0.01, c=3)
        assert_close_contract(got_v[rows], want["topk_values"], torch.bfloat16, f"topk_values {rows}")
        assert_indices_match(got_i[rows], want["topk_indices"], want["logits"], torch.bfloat16)
        outside = want["logits"].scatter(1, want["topk_indices"], float("-inf")).logsumexp(1)
        assert_close_contract(got_lse[rows], outside, torch.bfloat16, f"lse_outside {rows}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c,groups", [(1, 1), (3, 4)])
def test_negative_groups_on_the_gpu(fused, dtype, c, groups):
    """NegLabel's negative groups from the same launch, with the GPU tile configs: each group's
    log-sum-exp against float64, the ID outputs equal to the launch without negatives, and
    dk.score's neglabel against the float64 definition."""
    X, W = make_inputs(4099, 1000, 512, seed=11 + c, dtype=dtype)
    N = make_inputs(10_000, 1, 512, seed=12 + c, dtype=dtype)[0]
    *id_state, lse_neg = fused.fused_score_neg_state(X, W, N, inv_temp=100.0, c=c, groups=groups, normalize=True)
    for got, want in zip(id_state, fused.fused_score_state(X, W, inv_temp=100.0, c=c, normalize=True)):
        assert torch.equal(got, want)
    want = torch.logsumexp(logits64(X, N, 0.01).view(X.shape[0], groups, -1), dim=2)
    assert_close_contract(lse_neg, want, dtype, "lse_neg")
    got = dk.score(X, W, c=c, negatives=N, negative_groups=groups, backend="triton").neglabel
    assert_close_contract(got, neglabel64(X, W, N, temperature=0.01, groups=groups), dtype, "neglabel")


def test_memory_stays_linear_in_rows(fused):
    """K = 20000: the kernel's extra memory is its O(N·c) outputs, never the N×K logits."""
    n, k, d = 100_000, 20_000, 512
    X, W = make_inputs(n, k, d, seed=6, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fused.fused_score_state(X, W, inv_temp=100.0, c=1, normalize=True)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    # outputs (16 bytes a row at c = 1) + W's inverse norms (at most a float32 copy of W)
    assert extra < 16 * n + 4 * k * d + (16 << 20), f"extra memory {extra} bytes"  # N·K·4 = 8 GB


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_baseline_computes_the_logits(dtype):
    """The Triton GEMM baseline of the GPU benchmark (the fused kernel's tiles, no epilogue)."""
    from deltakern.ops.triton import gemm

    X, W = make_inputs(1031, 1001, 512, seed=14, dtype=dtype)
    got = gemm.logits(X, W, c=1)
    want = X.double() @ W.double().T
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * float(want.abs().max()))


def test_inputs_are_not_modified():
    X, W = make_inputs(1031, 257, 96, seed=8, dtype=torch.bfloat16)
    X0, W0 = X.clone(), W.clone()
    dk.score(X, W, c=3, backend="triton")
    assert torch.equal(X, X0) and torch.equal(W, W0)


def test_auto_picks_triton_on_cuda():
    assert dk.scoring.resolve_backend("auto", "cuda") == "triton"
    X, W = make_inputs(130, 70, 48, seed=10, dtype=torch.float64)
    got = dk.score(X, W, c=3, backend="triton")  # float64 stays float64 (the reference)
    want = scores64(X, W, c=3)
    torch.testing.assert_close(got.delta_energy, want["delta_energy"], rtol=1e-10, atol=1e-10)


def test_opcheck(fused):
    X, W = make_inputs(130, 70, 48, seed=11, dtype=torch.bfloat16)
    for c in (1, 3):
        torch.library.opcheck(torch.ops.deltakern.fused_score_state_triton.default, (X, W, None, 100.0, c, 1, True, False))
        torch.library.opcheck(torch.ops.deltakern.fused_score_state_triton.default, (X, W, W[:12].flip(0), 100.0, c, 4, True, False))


@pytest.mark.slow  # heavy: opt-in in bench/gpu_check.sh (GPU_CHECK_HEAVY=1)
def test_torch_compile_calls_the_op(fused):
    X, W = make_inputs(1031, 257, 96, seed=12, dtype=torch.bfloat16)

    def state(X, W):
        return fused.fused_score_state(X, W, inv_temp=100.0, c=3, normalize=True)

    compiled = torch.compile(state, fullgraph=True)
    for got, want in zip(compiled(X, W), state(X, W)):
        assert torch.equal(got, want)


@pytest.mark.slow  # heavy: opt-in in bench/gpu_check.sh (GPU_CHECK_HEAVY=1)
def test_autotuning_behind_env(fused, monkeypatch):
    monkeypatch.setenv("DELTAKERN_AUTOTUNE", "1")
    monkeypatch.setattr(fused, "_autotuned", None)
    X, W = make_inputs(1031, 1001, 512, seed=13, dtype=torch.bfloat16)
    assert fused._kernels() is not fused._fused_score_kernel
    check_scores(X, W, temperature=0.01, c=3, reset=0.0, dtype=torch.bfloat16)
