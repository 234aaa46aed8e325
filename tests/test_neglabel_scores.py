"""dk.score with negative labels: NegLabel against a float64 evaluation of its definition on
every CPU backend (confident rows and rows where the negatives dominate included), and the
ID-class scores unchanged by the negatives, bit for bit."""

from __future__ import annotations

import pytest
import torch
from oracle import assert_close_contract, neglabel64

import deltakern as dk

BACKENDS = dk.available_backends("cpu")


def make(n, k, m, d, seed, *, confident=False, negatives_dominate=False):
    g = torch.Generator().manual_seed(seed)
    W, N = torch.randn(k, d, generator=g), torch.randn(m, d, generator=g)
    X = torch.randn(n, d, generator=g)
    if confident:  # rows close to an ID class: e^50 more ID mass than negative mass at τ = 0.01
        X = W[torch.arange(n) % k] + 0.01 * X
    if negatives_dominate:
        X = N[torch.arange(n) % m] + 0.01 * X
    return X, W, N


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("case", ["random", "confident", "negatives_dominate"])
def test_neglabel_against_float64(backend, groups, case):
    X, W, N = make(37, 11, 41, 33, seed=7, confident=case == "confident", negatives_dominate=case == "negatives_dominate")
    for temperature in (0.01, 1.0):
        got = dk.score(X, W, c=2, temperature=temperature, negatives=N, negative_groups=groups, backend=backend).neglabel
        want = neglabel64(X, W, N, temperature=temperature, groups=groups)
        assert got.dtype == torch.float32
        assert_close_contract(got, want, torch.float32, f"neglabel ({case}, τ={temperature})")
        if case == "confident" and temperature == 0.01:
            # log share ≈ -e^{-Δ}: tiny and negative, with its digits (the share itself is 1.0f)
            assert bool((got < 0).all()) and bool((got > -1e-6).all())
            assert bool(((got - want).abs() <= 1e-4 * want.abs()).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_id_scores_are_unchanged_by_negatives(backend):
    X, W, N = make(25, 9, 16, 12, seed=3)
    plain = dk.score(X, W, c=3, reset=0.1, mode="joint", backend=backend)
    with_neg = dk.score(X, W, c=3, reset=0.1, mode="joint", backend=backend, negatives=N, negative_groups=2)
    assert plain.neglabel is None and "neglabel" not in plain.as_dict()
    for name, value in plain.as_dict().items():
        assert torch.equal(value, getattr(with_neg, name)), name


def test_float64_inputs_stay_float64():
    X, W, N = (t.double() for t in make(6, 4, 8, 5, seed=1))
    got = dk.score(X, W, negatives=N, negative_groups=2).neglabel
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, neglabel64(X, W, N, temperature=0.01, groups=2), rtol=1e-10, atol=1e-12)


def test_bad_negatives_name_the_argument():
    X, W, N = make(4, 3, 6, 5, seed=2)
    with pytest.raises(ValueError, match="X and negatives must share the embedding dimension"):
        dk.score(X, W, negatives=torch.randn(6, 4))
    with pytest.raises(ValueError, match=r"negative_groups must satisfy 1 <= negative_groups <= 6, got 7"):
        dk.score(X, W, negatives=N, negative_groups=7)
    with pytest.raises(ValueError, match="negatives contains non-finite values"):
        dk.score(X, W, negatives=torch.full((2, 5), float("nan")))
    before = N.clone()
    dk.score(X, W, negatives=N, negative_groups=3)
    assert torch.equal(N, before)
