"""Every CPU backend against the float64 oracle of docs/conventions.md §2 on odd shapes."""

from __future__ import annotations

import itertools

import pytest
import torch
from oracle import assert_close_contract, assert_indices_match, confident_rows, scores64

import deltakern as dk
from deltakern.reference import scoring as reference

CPU_BACKENDS = [b for b in ("reference", "cpp") if b in dk.available_backends("cpu")]
SCORE_FIELDS = ("delta_energy", "delta_energy_terms", "energy", "max_logit", "msp", "topk_values")
# (temperature, reset) settings cycled over the shapes so each shape meets one of them
SETTINGS = [(0.01, 0.0), (1.0, 0.1), (0.01, -0.2)]
SHAPES = [
    (n, k, d)
    for (n, k), d in itertools.product(itertools.product((1, 7, 257, 4099), (1, 2, 3, 1001)), (3, 65, 512))
    if not (n == 4099 and k == 1001 and d == 512)  # the largest case adds time, not coverage
]


def make_inputs(n: int, k: int, d: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g) * (0.5 + torch.rand(n, 1, generator=g))
    W = torch.randn(k, d, generator=g)
    return X.to(dtype), W.to(dtype)


def check_against_oracle(X, W, c, temperature, reset, backend, dtype):
    got = dk.score_modes(X, W, temperature=temperature, c=c, reset=reset, backend=backend)
    for mode, scores in got.items():
        want = scores64(X, W, temperature=temperature, c=c, reset=reset, mode=mode)
        for field in SCORE_FIELDS:
            assert_close_contract(getattr(scores, field), want[field], dtype, f"{backend}/{mode}/{field}")
        assert_indices_match(scores.topk_indices, want["topk_indices"], want["logits"], dtype)
        assert scores.pred.dtype == torch.int64 and scores.topk_indices.dtype == torch.int64
        assert scores.delta_energy.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n,k,d", SHAPES)
def test_backends_match_float64_oracle(backend, n, k, d):
    temperature, reset = SETTINGS[(n + k + d) % len(SETTINGS)]
    X, W = make_inputs(n, k, d, seed=n * 31 + k * 7 + d)
    for c in (1, 2, 5):
        if c <= k:
            check_against_oracle(X, W, c, temperature, reset, backend, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes(backend, dtype):
    X, W = make_inputs(257, 1001, 65, seed=3, dtype=dtype)
    for c in (1, 5):
        check_against_oracle(X, W, c, 0.01, 0.05, backend, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_confident_rows_keep_every_digit(backend):
    # Top-1 probability > 1 - 1e-12: subtracting exp(top) from the full sum would lose all digits.
    X, W = confident_rows(64, 1001, 512, seed=1)
    want = scores64(X, W, temperature=0.01, c=2)
    assert bool((want["msp"] > 1 - 1e-12).all()), "the fixture must produce confident rows"
    for mode in ("separate", "joint"):
        got = dk.score(X, W, temperature=0.01, c=2, mode=mode, backend=backend)
        want = scores64(X, W, temperature=0.01, c=2, mode=mode)
        for field in SCORE_FIELDS:
            assert_close_contract(getattr(got, field), want[field], torch.float32, f"{mode}/{field}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ties_go_to_lower_class_index(backend):
    # Small integers make every dot product exact whatever the matmul's summation order, so
    # duplicated class rows give bit-identical logits and tie-breaking is tested exactly.
    g = torch.Generator().manual_seed(0)
    X = torch.randint(-3, 4, (9, 16), generator=g).float()
    base = torch.randint(-3, 4, (4, 16), generator=g).float()
    W = torch.cat([base, base[[1, 0]], base])
    got = dk.score(X, W, c=4, normalize=False, temperature=1.0, backend=backend)
    want = scores64(X, W, c=4, normalize=False, temperature=1.0)
    assert torch.equal(got.topk_indices, want["topk_indices"])
    assert torch.equal(got.topk_values.double(), want["topk_values"])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unnormalized_logits(backend):
    X, W = make_inputs(33, 17, 9, seed=5)
    got = dk.score(X, W, normalize=False, temperature=2.0, c=3, backend=backend)
    want = scores64(X, W, normalize=False, temperature=2.0, c=3)
    for field in SCORE_FIELDS:
        assert_close_contract(getattr(got, field), want[field], torch.float32, field)


def test_backends_agree_with_each_other_and_c_equals_k():
    X, W = make_inputs(130, 6, 33, seed=11)
    results = [dk.score(X, W, c=6, mode="joint", backend=b) for b in CPU_BACKENDS]
    for r in results[1:]:
        torch.testing.assert_close(r.delta_energy, results[0].delta_energy, rtol=1e-5, atol=1e-5)
        assert torch.equal(r.topk_indices, results[0].topk_indices)
    # c == K in joint mode resets every logit: LSE becomes log(K) + r/τ.
    expected = results[0].energy.double() - torch.log(torch.tensor(6.0, dtype=torch.float64))
    torch.testing.assert_close(results[0].delta_energy.double(), expected, rtol=1e-5, atol=1e-4)


def test_c_equal_one_modes_agree_and_convenience_functions():
    X, W = make_inputs(50, 40, 24, seed=2)
    sep = dk.score(X, W, c=1, mode="separate")
    joint = dk.score(X, W, c=1, mode="joint")
    torch.testing.assert_close(sep.delta_energy, joint.delta_energy)
    torch.testing.assert_close(dk.delta_energy(X, W), sep.delta_energy)
    torch.testing.assert_close(dk.energy(X, W), sep.energy)
    torch.testing.assert_close(dk.max_logit(X, W), sep.max_logit)
    torch.testing.assert_close(dk.msp(X, W), sep.msp)
    want_mcm = scores64(X, W, temperature=1.0)["msp"]
    assert_close_contract(dk.mcm(X, W), want_mcm, torch.float32, "mcm")


def test_terms_give_every_smaller_c():
    X, W = make_inputs(40, 30, 16, seed=9)
    full = dk.score(X, W, c=5, mode="separate")
    for c in range(1, 6):
        smaller = dk.score(X, W, c=c, mode="separate")
        torch.testing.assert_close(full.delta_energy_terms[:, :c].sum(1), smaller.delta_energy, rtol=1e-5, atol=1e-5)
        joint_full = dk.score(X, W, c=5, mode="joint")
        joint_c = dk.score(X, W, c=c, mode="joint")
        torch.testing.assert_close(joint_full.delta_energy_terms[:, c - 1], joint_c.delta_energy, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inputs_are_not_modified_and_strided_inputs_work(backend):
    X, W = make_inputs(64, 20, 48, seed=4)
    X_strided = torch.randn(48, 64).T  # non-contiguous view
    X_before, W_before, Xs_before = X.clone(), W.clone(), X_strided.clone()
    dk.score(X, W, c=3, backend=backend)
    got = dk.score(X_strided, W, c=3, backend=backend)
    assert torch.equal(X, X_before) and torch.equal(W, W_before) and torch.equal(X_strided, Xs_before)
    want = scores64(X_strided, W, c=3)
    assert_close_contract(got.delta_energy, want["delta_energy"], torch.float32, "strided")


def test_reference_chunking_does_not_change_results():
    X, W = make_inputs(100, 37, 10, seed=6)
    whole = reference.score_state(X, W, temperature=0.01, c=3, normalize=True)
    chunked = reference.score_state(X, W, temperature=0.01, c=3, normalize=True, chunk_elements=37 * 7)
    # A different row blocking may round the matmul differently, but only in the last bit.
    torch.testing.assert_close(whole[0], chunked[0], rtol=1e-6, atol=1e-5)
    assert torch.equal(whole[1], chunked[1])
    torch.testing.assert_close(whole[2], chunked[2], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("c", [1, 2, 7, 40])
def test_reference_top_c_equals_a_stable_full_sort_under_heavy_ties(c):
    g = torch.Generator().manual_seed(c)
    logits = torch.randint(0, 5, (300, 40), generator=g).double()  # many exact ties per row
    values, indices = reference.top_c(logits, c)
    want = torch.sort(logits, dim=1, descending=True, stable=True)
    assert torch.equal(values, want.values[:, :c])
    assert torch.equal(indices, want.indices[:, :c])
