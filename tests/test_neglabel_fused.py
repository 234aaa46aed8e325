"""The NegLabel state in one pass: the C++ op ``deltakern::fused_score_neg_state`` and the
reference's one-pass ``score_neg_state`` against the float64 log-sum-exps of each negative
group, with ID outputs equal bit for bit to the op without negatives (docs/conventions.md §2.5).
The Triton kernel's negative groups are tested under the interpreter in tests/test_triton.py."""

from __future__ import annotations

import pytest
import torch
from _half_gemms import half_gemms
from oracle import assert_close_contract, logits64

from deltakern.ops import extension, registry
from deltakern.reference import negatives as reference_negatives
from deltakern.reference import scoring as reference

needs_ext = pytest.mark.skipif(
    not extension.available() or not registry.has_kernel("fused_score_neg_state", "CPU"),
    reason="the extension has no fused_score_neg_state CPU kernel",
)
HALF_GEMMS = half_gemms()  # DELTAKERN_CPU_HALF_GEMM: every half-precision path this machine runs


def inputs(n, k, m, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    scale = lambda rows: 0.5 + torch.rand(rows, 1, generator=g)  # noqa: E731
    X = torch.randn(n, d, generator=g) * scale(n)
    W = torch.randn(k, d, generator=g) * scale(k)
    N = torch.randn(m, d, generator=g) * scale(m)
    return X.to(dtype), W.to(dtype), N.to(dtype)


def group_lse64(X, N, *, temperature, groups, normalize=True):
    """Float64 log-sum-exp of each consecutive group of N's rows, from the full logits."""
    logits = logits64(X, N, temperature, normalize)
    return torch.logsumexp(logits.view(X.shape[0], groups, -1), dim=2)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,m,d,c,groups", [(1, 1, 1, 3, 1, 1), (45, 37, 70, 40, 3, 5), (700, 13, 96, 17, 2, 3)])
@pytest.mark.parametrize("normalize", [True, False])
def test_op_against_float64(monkeypatch, dtype, n, k, m, d, c, groups, normalize):
    X, W, N = inputs(n, k, m, d, seed=n + m, dtype=dtype)
    temperature = 0.01 if normalize else 1.0
    for half_gemm in HALF_GEMMS if dtype in (torch.bfloat16, torch.float16) else ("auto",):
        monkeypatch.setenv("DELTAKERN_CPU_HALF_GEMM", half_gemm)
        top_v, top_i, outside, lse_neg = registry.fused_score_neg_state(X, W, N, 1 / temperature, c, groups, normalize)
        # The ID outputs are the op's without negatives, bit for bit.
        for got, want in zip((top_v, top_i, outside), registry.fused_score_state(X, W, 1 / temperature, c, normalize)):
            assert torch.equal(got, want)
        assert lse_neg.shape == (n, groups) and lse_neg.dtype == outside.dtype
        want = group_lse64(X, N, temperature=temperature, groups=groups, normalize=normalize)
        assert_close_contract(lse_neg, want, dtype, f"lse_neg ({half_gemm})")


@needs_ext
def test_op_rows_far_outside_the_float_range():
    """Tiny and huge rows (rescaled by powers of two inside the op) and negatives that dominate."""
    X, W, N = inputs(300, 9, 24, 16, seed=5)
    X[::3] *= 1e-30
    X[1::3] *= 1e30
    N[::2] *= 1e-25
    X[5] = N[7] * 3.0  # a row sitting on a negative label
    _, _, _, lse_neg = registry.fused_score_neg_state(X, W, N, 100.0, 2, 4, True)
    want = group_lse64(X, N, temperature=0.01, groups=4)
    assert_close_contract(lse_neg, want, torch.float32, "lse_neg of tiny and huge rows")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck(dtype):
    X, W, N = inputs(7, 3, 12, 65, seed=1, dtype=dtype)
    torch.library.opcheck(torch.ops.deltakern.fused_score_neg_state.default, (X, W, N, 100.0, 2, 4, True))


@needs_ext
def test_op_refuses_bad_arguments():
    X, W, N = inputs(4, 3, 6, 5, seed=2)
    op = torch.ops.deltakern.fused_score_neg_state
    with pytest.raises(RuntimeError, match="groups must divide the M = 6 rows of w_neg"):
        op(X, W, N, 100.0, 1, 4, True)
    with pytest.raises(RuntimeError, match="groups must divide"):
        op(X, W, N, 100.0, 1, 0, True)
    with pytest.raises(RuntimeError, match="w_neg must have w's dtype Float, got Double"):
        op(X, W, N.double(), 100.0, 1, 2, True)
    with pytest.raises(RuntimeError, match="w_neg must have x's D = 5"):
        op(X, W, N[:, :4], 100.0, 1, 2, True)
    with pytest.raises(RuntimeError, match="w_neg must be a dense 2-D tensor"):
        op(X, W, N[0], 100.0, 1, 1, True)
    with pytest.raises(RuntimeError, match="row 2 of negatives is zero"):
        op(X, W, torch.cat([N[:2], torch.zeros(1, 5), N[3:]]), 100.0, 1, 2, True)
    huge = N.clone()
    huge[1] = 3e38
    with pytest.raises(RuntimeError, match="logits of row 0 against the negatives are not finite"):
        op(X * 1e10, W, huge, 1.0, 1, 2, False)


def test_reference_one_pass_equals_two_passes():
    """The reference's one-pass state is its ID state plus its separate negative pass, chunked
    or not (the chunk boundary falls inside the rows; a matmul over a different number of rows
    may round differently, hence the tolerance)."""
    X, W, N = inputs(29, 7, 15, 9, seed=4)
    for chunk_elements in (reference.DEFAULT_CHUNK_ELEMENTS, 22 * 4):
        got = reference_negatives.score_neg_state(
            X, W, N, temperature=0.01, c=2, groups=3, normalize=True, chunk_elements=chunk_elements
        )
        for a, b in zip(got[:3], reference.score_state(X, W, temperature=0.01, c=2, normalize=True)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
        want = reference_negatives.negative_lse(X, N, temperature=0.01, groups=3, normalize=True)
        torch.testing.assert_close(got[3], want, rtol=0, atol=1e-5)
        assert_close_contract(got[3], group_lse64(X, N, temperature=0.01, groups=3), torch.float32, "reference")
