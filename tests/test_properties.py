"""Property-based tests (hypothesis): every CPU backend against the float64 oracle, and the
metrics against a brute-force oracle, over random inputs.

Draw counts come from the hypothesis profile (tests/conftest.py): "fast" (25 draws per property)
in every run, "ci" (1,000 draws per property) with ``DELTAKERN_HYPOTHESIS_PROFILE=ci`` or
``pytest -m slow tests/test_properties.py``. Inputs are generated from a drawn seed with torch's
generator (fast for matrices); the shapes, dtypes, layouts and settings are drawn directly, so a
failure shrinks towards the smallest case.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from oracle import assert_close_contract, assert_indices_match, scores64, tolerance

import deltakern as dk
from deltakern import metrics as M

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.slow  # `pytest -m slow` selects them and their 1,000-draw profile

CPU_BACKENDS = [b for b in ("reference", "cpp") if b in dk.available_backends("cpu")]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SCORE_FIELDS = ("delta_energy", "delta_energy_terms", "energy", "max_logit", "msp", "topk_values")
# Row scales: ordinary, tiny (float32 sums of squares underflow), huge (they overflow). Only
# with normalize=True, where a row's scale changes no cosine.
ROW_SCALES = [1.0, 1.0, 1.0, 1e-21, 1e-30, 1e20]


# ---------------------------------------------------------------------------------------------
# scores


def _layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values in another memory layout: a transposed copy viewed back, or every other
    row/column of a larger tensor (non-contiguous views)."""
    if how == "transposed":
        return t.T.contiguous().T
    if how == "strided_rows":
        wide = torch.zeros(t.shape[0] * 2, t.shape[1], dtype=t.dtype)
        wide[::2] = t
        return wide[::2]
    if how == "strided_cols":
        wide = torch.zeros(t.shape[0], t.shape[1] * 2, dtype=t.dtype)
        wide[:, ::2] = t
        return wide[:, ::2]
    return t


@st.composite
def scoring_cases(draw):
    n = draw(st.integers(1, 33))
    k = draw(st.integers(1, 40))
    d = draw(st.integers(1, 48))
    c = draw(st.integers(1, min(k, 17)))  # up to one above the Triton kernel's limit
    x_dtype = draw(st.sampled_from(DTYPES))
    w_dtype = draw(st.sampled_from([x_dtype, x_dtype, x_dtype] + DTYPES))  # mostly the same
    normalize = draw(st.booleans()) if d > 1 else True
    temperature = draw(st.floats(math.log(0.005), math.log(5.0)).map(math.exp))
    reset = draw(st.floats(-0.5, 0.5))
    kind = draw(st.sampled_from(["gaussian", "confident", "integers"]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(k, d, generator=g, dtype=torch.float64)
    if kind == "confident":
        # Rows close to one class row: top-1 probabilities up to 1 - 1e-12 and beyond.
        W = W / W.norm(dim=1, keepdim=True)
        X = W[torch.randint(0, k, (n,), generator=g)] * 3 + 0.03 * torch.randn(n, d, generator=g, dtype=torch.float64)
    elif kind == "integers":
        # Small integers, and class rows repeated: dot products are exact in every dtype and
        # order of summation, so equal logits are bit-identical ties (lower class index first).
        X = torch.randint(-3, 4, (n, d), generator=g).double()
        W = torch.randint(-3, 4, (k, d), generator=g).double()
        W = W[torch.randint(0, max(1, k // 2), (k,), generator=g)]
        normalize = False
        temperature = 2.0 ** draw(st.integers(-7, 2))  # exact scaling keeps the ties exact
    else:
        X = torch.randn(n, d, generator=g, dtype=torch.float64) * (0.25 + torch.rand(n, 1, generator=g, dtype=torch.float64))
    if not normalize and kind != "integers":  # raw dot products: keep logits moderate
        X, W = X / math.sqrt(d), W / math.sqrt(d)
    X, W = X.to(x_dtype), W.to(w_dtype)
    if normalize:
        x_scales = torch.tensor(draw(st.lists(st.sampled_from(ROW_SCALES), min_size=n, max_size=n)), dtype=torch.float64)
        w_scale = draw(st.sampled_from(ROW_SCALES))
        if x_dtype in (torch.float32, torch.float64):
            X = (X.double() * x_scales[:, None]).to(x_dtype)
        if w_dtype in (torch.float32, torch.float64):
            W = (W.double() * w_scale).to(w_dtype)
        # A row that underflowed to zero in its dtype is not a case for these properties.
        hypothesis.assume(bool((X != 0).any(dim=1).all()) and bool((W != 0).any(dim=1).all()))
    X = _layout(X, draw(st.sampled_from(["contiguous", "transposed", "strided_rows", "strided_cols"])))
    W = _layout(W, draw(st.sampled_from(["contiguous", "transposed", "strided_rows"])))
    return dict(X=X, W=W, c=c, temperature=temperature, reset=reset, normalize=normalize, exact_ties=kind == "integers")


def _contract_dtype(X: torch.Tensor, W: torch.Tensor) -> torch.dtype:
    """The dtype whose tolerance applies: the less precise input (docs/conventions.md §3.1)."""
    return max((X.dtype, W.dtype), key=tolerance)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(case=scoring_cases())
def test_scores_match_the_float64_oracle(backend, case):
    X, W = case["X"], case["W"]
    settings = {key: case[key] for key in ("c", "temperature", "reset", "normalize")}
    X_before, W_before = X.clone(), W.clone()
    got = dk.score_modes(X, W, modes=("separate", "joint"), backend=backend, **settings)
    dtype = _contract_dtype(X, W)
    out_dtype = torch.float64 if torch.float64 in (X.dtype, W.dtype) else torch.float32
    for mode, scores in got.items():
        want = scores64(X, W, mode=mode, **settings)
        for field in SCORE_FIELDS:
            value = getattr(scores, field)
            assert value.dtype == out_dtype
            assert_close_contract(value, want[field], dtype, f"{backend}/{mode}/{field}")
        if case["exact_ties"]:  # bit-identical logits: the tie rule decides, exactly
            assert torch.equal(scores.topk_indices, want["topk_indices"])
        else:
            assert_indices_match(scores.topk_indices, want["topk_indices"], want["logits"], dtype)
        assert torch.equal(scores.pred, scores.topk_indices[:, 0])
    assert torch.equal(X, X_before) and torch.equal(W, W_before)


# ---------------------------------------------------------------------------------------------
# metrics


def _brute_curve(pos: list, neg: list) -> list[tuple]:
    """(threshold, TP, FP) at every distinct score, highest first: counts of scores >= t."""
    return [(t, sum(p >= t for p in pos), sum(q >= t for q in neg)) for t in sorted(set(pos) | set(neg), reverse=True)]


def _brute(pos: list, neg: list, tpr: float) -> dict:
    """Every metric of docs/conventions.md §5 with ``pos`` as the positive class, by brute force."""
    curve = _brute_curve(pos, neg)
    wins = sum(2 * (p > q) + (p == q) for p in pos for q in neg)
    first = next(g for g, (_, tp, _) in enumerate(curve) if tp / len(pos) >= tpr)
    ap, prev_tp = 0.0, 0
    for _, tp, fp in curve:
        ap += (tp - prev_tp) / len(pos) * (tp / (tp + fp))
        prev_tp = tp
    return {
        "auroc": float(Fraction(wins, 2 * len(pos) * len(neg))),
        "fpr": curve[first][2] / len(neg),
        "threshold": curve[first][0],
        "ap": ap,
        "curve": curve,
    }


@st.composite
def metric_cases(draw):
    """Tie-heavy scores: a few levels shared by both sets, sometimes ±inf, as ints or floats."""
    levels = draw(st.integers(1, 6))
    values = st.integers(0, levels - 1)
    id_s = draw(st.lists(values, min_size=1, max_size=60))
    ood_s = draw(st.lists(values, min_size=1, max_size=60))
    kind = draw(st.sampled_from(["int64", "int8", "float32", "float64", "mixed", "inf", "tensor"]))
    scale = draw(st.sampled_from([1.0, 0.5, -1.0]))
    id_v = [v * scale for v in id_s]
    ood_v = [v * scale for v in ood_s]
    if kind in ("int64", "int8") and scale == 1.0:
        dtype = np.int64 if kind == "int64" else np.int8
        return id_v, ood_v, np.array(id_s, dtype), np.array(ood_s, dtype)
    if kind == "inf":
        id_v = [float("inf") if v == 0 else v for v in id_v]
        ood_v = [-float("inf") if v == levels - 1 else v for v in ood_v]
    if kind == "tensor":
        return id_v, ood_v, torch.tensor(id_v, dtype=torch.float32), torch.tensor(ood_v, dtype=torch.float64)
    if kind == "mixed":
        return id_v, ood_v, np.array(id_v, np.float32), np.array(ood_v, np.float64)
    dtype = np.float32 if kind == "float32" else np.float64
    return id_v, ood_v, np.array(id_v, dtype), np.array(ood_v, dtype)


@given(case=metric_cases(), tpr=st.sampled_from([0.95, 0.5, 1.0, 0.01, 0.8]))
def test_metrics_match_a_brute_force_oracle(case, tpr):
    id_v, ood_v, id_in, ood_in = case
    got = M.ood_metrics(id_in, ood_in, tpr=tpr)
    as_id = _brute(id_v, ood_v, tpr)
    as_ood = _brute([-v for v in ood_v], [-v for v in id_v], tpr)
    assert got["auroc"] == as_id["auroc"]  # both correctly rounded from the exact fraction
    assert got["fpr95"] == as_id["fpr"]
    assert got["threshold"] == as_id["threshold"]
    assert got["fpr95_ood_positive"] == as_ood["fpr"]
    assert got["aupr_in"] == pytest.approx(as_id["ap"], rel=1e-12, abs=1e-15)
    assert got["aupr_out"] == pytest.approx(as_ood["ap"], rel=1e-12, abs=1e-15)
    assert (got["n_id"], got["n_ood"]) == (len(id_v), len(ood_v))
    for positive, brute, pos, neg in (("id", as_id, id_v, ood_v), ("ood", as_ood, ood_v, id_v)):
        fpr, tpr_curve, thresholds = M.roc_curve(id_in, ood_in, positive=positive)
        assert thresholds[0] == math.inf and fpr[0] == 0 and tpr_curve[0] == 0
        assert thresholds[1:].tolist() == [t for t, _, _ in brute["curve"]]
        assert tpr_curve[1:].tolist() == [tp / len(pos) for _, tp, _ in brute["curve"]]
        assert fpr[1:].tolist() == [fp / len(neg) for _, _, fp in brute["curve"]]
