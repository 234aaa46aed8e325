"""Every bad input of docs/conventions.md §8 for the scoring API raises the right type naming the argument."""

from __future__ import annotations

import math

import pytest
import torch

import deltakern as dk


def good():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 8, generator=g), torch.randn(4, 8, generator=g)


def with_value(t: torch.Tensor, value: float) -> torch.Tensor:
    t = t.clone()
    t[1, 2] = value
    return t


X, W = good()

CASES = [
    # (id, X, W, kwargs, exception, words the message must contain)
    ("nan in X", with_value(X, math.nan), W, {}, ValueError, ["X", "non-finite"]),
    ("inf in X", with_value(X, math.inf), W, {}, ValueError, ["X", "non-finite"]),
    ("-inf in W", X, with_value(W, -math.inf), {}, ValueError, ["W", "non-finite"]),
    ("zero row in X", torch.cat([X, torch.zeros(1, 8)]), W, {}, ValueError, ["X", "zero-norm", "row 5"]),
    ("zero row in W", X, torch.cat([torch.zeros(1, 8), W]), {}, ValueError, ["W", "zero-norm", "row 0"]),
    ("D mismatch", X, torch.randn(4, 7), {}, ValueError, ["X.shape[1]=8", "W.shape[1]=7"]),
    ("X 1-D", X[0], W, {}, ValueError, ["X", "2-D", "(8,)"]),
    ("W 3-D", X, W[None], {}, ValueError, ["W", "2-D"]),
    ("N == 0", X[:0], W, {}, ValueError, ["X", "at least one row"]),
    ("K == 0", X, W[:0], {}, ValueError, ["W", "at least one row"]),
    ("D == 0", X[:, :0], W[:, :0], {}, ValueError, ["X", "one column"]),
    ("c < 1", X, W, {"c": 0}, ValueError, ["c", "1 <= c <= 4", "0"]),
    ("c > K", X, W, {"c": 5}, ValueError, ["c", "<= 4", "5"]),
    ("c float", X, W, {"c": 1.5}, TypeError, ["c", "int", "float"]),
    ("temperature 0", X, W, {"temperature": 0.0}, ValueError, ["temperature", "> 0", "0.0"]),
    ("temperature < 0", X, W, {"temperature": -0.01}, ValueError, ["temperature", "> 0", "-0.01"]),
    ("temperature nan", X, W, {"temperature": math.nan}, ValueError, ["temperature"]),
    ("temperature str", X, W, {"temperature": "0.01"}, TypeError, ["temperature", "str"]),
    ("reset inf", X, W, {"reset": math.inf}, ValueError, ["reset", "finite"]),
    ("unknown mode", X, W, {"mode": "both"}, ValueError, ["mode", "'separate'", "'joint'", "'both'"]),
    ("unknown backend", X, W, {"backend": "cuda"}, ValueError, ["backend", "'auto'", "'cuda'"]),
    ("integer X", X.long(), W, {}, TypeError, ["X", "floating", "torch.int64"]),
    ("integer W", X, W.int(), {}, TypeError, ["W", "floating", "torch.int32"]),
    ("X not a tensor", X.tolist(), W, {}, TypeError, ["X", "torch.Tensor", "list"]),
    ("normalize not bool", X, W, {"normalize": 1}, TypeError, ["normalize", "bool"]),
    ("different devices", X, W.to("meta"), {}, ValueError, ["same device", "cpu", "meta"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("fn", [dk.score, dk.delta_energy, dk.mcm])
def test_bad_input_is_rejected_with_a_clear_message(case, fn):
    _, x, w, kwargs, exc, words = case
    x_before = x.clone() if isinstance(x, torch.Tensor) and x.device.type == "cpu" else None
    with pytest.raises(exc) as info:
        fn(x, w, **kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} missing from {message!r}"
    if x_before is not None:
        # NaN != NaN: compare with NaNs matching NaNs, bit for bit otherwise.
        torch.testing.assert_close(x, x_before, rtol=0, atol=0, equal_nan=True, msg="a failed call changed X")


def test_zero_rows_are_fine_without_normalisation():
    x = torch.cat([X, torch.zeros(1, 8)])
    r = dk.score(x, W, normalize=False, temperature=1.0)
    # A zero row has all logits 0: energy = log K exactly.
    assert abs(float(r.energy[-1]) - math.log(4)) < 1e-6


def test_unavailable_backend_names_the_available_ones():
    if "triton" in dk.available_backends("cpu"):
        pytest.skip("Triton runs on CPU here (TRITON_INTERPRET=1)")
    with pytest.raises(ValueError) as info:
        dk.score(X, W, backend="triton")
    message = str(info.value)
    assert "backend='triton'" in message and "available:" in message and "'reference'" in message


def test_huge_and_tiny_rows_are_scored_when_normalised():
    # dk.score rescales such rows by a power of two (docs/conventions.md §8.2), so a huge row
    # scores like the same row at ordinary scale instead of being refused or garbled.
    for scale in (1e30, 1e-23):
        x = X.clone()
        x[0] *= scale
        got = dk.score(x, W, c=2)
        want = dk.score(X, W, c=2)
        torch.testing.assert_close(got.delta_energy, want.delta_energy, rtol=1e-5, atol=1e-5)


def test_huge_rows_are_refused_without_normalisation():
    x = X.clone()
    x[0] = 1e30  # finite, but its float32 sum of squares overflows
    with pytest.raises(ValueError, match="norm overflows"):
        dk.score(x, W, normalize=False)


def test_callers_that_do_not_rescale_refuse_rows_they_cannot_normalise():
    # The kNN score normalises with a plain sum of squares: a tiny row is refused with its own
    # message (it is not a zero row), a huge one as overflowing. The EBM loss on CPU normalises
    # robustly (docs/conventions.md §6.4): the same rows give the loss of the unscaled rows.
    from deltakern.ood.knn import knn_score

    labels = torch.zeros(5, dtype=torch.long)
    for scale, words in ((1e-23, "too small to normalise"), (1e30, "norm overflows")):
        x = X.clone()
        x[2] *= scale
        with pytest.raises(ValueError, match=words) as info:
            knn_score(x, W, k=2, backend="torch")
        assert "row 2" in str(info.value) and "zero-norm" not in str(info.value)
        assert float(dk.ebm_loss(x, W, labels)) == pytest.approx(float(dk.ebm_loss(X, W, labels)), rel=1e-5)
    assert float(dk.ebm_loss(X * 1e-18, W, labels)) == pytest.approx(float(dk.ebm_loss(X, W, labels)), rel=1e-5)


def test_only_all_zero_rows_are_zero_norm_rows():
    x = X.clone()
    x[3] = 0.0
    x[3, 5] = 1e-45  # the smallest float32 subnormal: a non-zero row
    dk.score(x, W)
    x[3, 5] = 0.0
    with pytest.raises(ValueError, match="zero-norm row \\(row 3\\)") as info:
        dk.score(x, W)
    assert info.value.param == "X"
