"""dk.metrics against scikit-learn, hand-computed cases and identities (docs/conventions.md §5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

import deltakern as dk
from deltakern import metrics as M

RTOL = 1e-12  # float64 results that differ from scikit-learn only in summation order


def sk_inputs(id_s, ood_s):
    y = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
    return y, np.r_[np.asarray(id_s, np.float64), np.asarray(ood_s, np.float64)]


def sk_fpr_first(y, s, level):
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    return fpr[np.argmax(tpr >= level)]


def sk_fpr_interp(y, s, level):
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    b = int(np.argmax(tpr >= level))
    if tpr[b] == level:
        return fpr[b]
    a = b - 1
    return fpr[a] + (level - tpr[a]) * (fpr[b] - fpr[a]) / (tpr[b] - tpr[a])


def brute_fpr_nearest(id_s, ood_s, level):
    """The MCM/Hendrycks rule by brute force: thresholds from the top down to the lowest ID
    score, TPR nearest ``level``, equal distances to the lower threshold."""
    id_s, ood_s = np.asarray(id_s, np.float64), np.asarray(ood_s, np.float64)
    candidates = sorted({float(v) for v in np.r_[id_s, ood_s] if v >= id_s.min()}, reverse=True)
    best_t, best_d = None, None
    for t in candidates:
        d = abs(np.sum(id_s >= t) / len(id_s) - level)
        if best_d is None or d <= best_d:  # <=: a later (lower) threshold wins ties
            best_t, best_d = t, d
    return np.sum(ood_s >= best_t) / len(ood_s)


def random_case(seed, n_id, n_ood, levels):
    """Integer-valued scores on a few levels: many exact ties across and within the sets."""
    rng = np.random.default_rng(seed)
    id_s = rng.integers(0, levels, n_id).astype(np.float32) + 0.5
    ood_s = rng.integers(0, levels, n_ood).astype(np.float32)
    ood_s[rng.random(n_ood) < 0.5] += 0.5  # half of OOD tie with ID levels
    return id_s, ood_s


CASES = [(0, 1, 1, 2), (1, 1, 9, 3), (2, 13, 1, 4), (3, 57, 31, 5), (4, 200, 333, 7), (5, 1001, 97, 50), (6, 40, 40, 1)]


@pytest.mark.parametrize("seed,n_id,n_ood,levels", CASES)
def test_against_sklearn_with_ties(seed, n_id, n_ood, levels):
    id_s, ood_s = random_case(seed, n_id, n_ood, levels)
    y, s = sk_inputs(id_s, ood_s)
    assert M.auroc(id_s, ood_s) == pytest.approx(skm.roc_auc_score(y, s), rel=RTOL, abs=RTOL)
    assert M.aupr(id_s, ood_s) == pytest.approx(skm.average_precision_score(y, s), rel=RTOL)
    assert M.aupr(id_s, ood_s, "ood") == pytest.approx(skm.average_precision_score(1 - y, -s), rel=RTOL)
    p, r, _ = skm.precision_recall_curve(y, s)
    assert M.aupr(id_s, ood_s, method="trapezoid") == pytest.approx(skm.auc(r, p), rel=RTOL)
    p, r, _ = skm.precision_recall_curve(1 - y, -s)
    assert M.aupr(id_s, ood_s, "ood", "trapezoid") == pytest.approx(skm.auc(r, p), rel=RTOL)
    for level in (0.95, 0.8, 0.5, 1.0, 0.01):
        assert M.fpr_at_tpr(id_s, ood_s, level) == sk_fpr_first(y, s, level)
        assert M.fpr_at_tpr(id_s, ood_s, level, positive="ood") == sk_fpr_first(1 - y, -s, level)
        assert M.fpr_at_tpr(id_s, ood_s, level, rule="interp") == pytest.approx(sk_fpr_interp(y, s, level), rel=RTOL, abs=RTOL)
        assert M.fpr_at_tpr(id_s, ood_s, level, rule="nearest") == brute_fpr_nearest(id_s, ood_s, level)
        assert M.fpr_at_tpr(id_s, ood_s, level, "ood", "nearest") == brute_fpr_nearest(-ood_s, -id_s, level)


@pytest.mark.parametrize("n_id,n_ood", [(5000, 3001), (777, 20000)])
def test_continuous_scores_against_sklearn(n_id, n_ood):
    rng = np.random.default_rng(n_id)
    id_s = rng.normal(1.0, 1.0, n_id).astype(np.float32)
    ood_s = rng.normal(0.0, 1.5, n_ood).astype(np.float32)
    y, s = sk_inputs(id_s, ood_s)
    got = M.ood_metrics(id_s, ood_s)
    assert set(got) == {"auroc", "fpr95", "aupr_in", "aupr_out", "threshold", "fpr95_ood_positive", "n_id", "n_ood"}
    assert got["auroc"] == pytest.approx(skm.roc_auc_score(y, s), rel=RTOL)
    assert got["aupr_in"] == pytest.approx(skm.average_precision_score(y, s), rel=RTOL)
    assert got["aupr_out"] == pytest.approx(skm.average_precision_score(1 - y, -s), rel=RTOL)
    assert got["fpr95"] == sk_fpr_first(y, s, 0.95)
    assert got["fpr95_ood_positive"] == sk_fpr_first(1 - y, -s, 0.95)
    assert (got["n_id"], got["n_ood"]) == (n_id, n_ood)
    # the threshold: the highest score keeping >= 95% of ID
    t = got["threshold"]
    assert np.mean(id_s >= t) >= 0.95 and np.mean(id_s > t) < 0.95
    assert got["fpr95"] == np.mean(ood_s >= t)


def test_roc_curve_matches_sklearn_full_curve():
    id_s, ood_s = random_case(11, 64, 80, 9)
    y, s = sk_inputs(id_s, ood_s)
    fpr, tpr, thr = M.roc_curve(id_s, ood_s)
    e_fpr, e_tpr, e_thr = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_array_equal(fpr.numpy(), e_fpr)
    np.testing.assert_array_equal(tpr.numpy(), e_tpr)
    np.testing.assert_array_equal(thr.numpy()[1:], e_thr[1:])
    assert thr[0] == float("inf")


def test_roc_curve_with_ood_positive_has_negated_thresholds():
    # docs/conventions.md §5.2: OOD positive, scores negated; thresholds are negated scores.
    id_s, ood_s = random_case(12, 70, 55, 9)
    y, s = sk_inputs(id_s, ood_s)
    fpr, tpr, thr = M.roc_curve(id_s, ood_s, positive="ood")
    e_fpr, e_tpr, e_thr = skm.roc_curve(1 - y, -s, drop_intermediate=False)
    np.testing.assert_array_equal(fpr.numpy(), e_fpr)
    np.testing.assert_array_equal(tpr.numpy(), e_tpr)
    np.testing.assert_array_equal(thr.numpy()[1:], e_thr[1:])
    assert thr[0] == float("inf")
    # Read back: at each threshold t the detected OOD scores are exactly those with -score >= t.
    for t, rate in zip(thr.numpy()[1:], tpr.numpy()[1:]):
        assert np.mean(-ood_s >= t) == rate


# ---------------------------------------------------------------------------------------------
# hand-computed cases


def test_heavy_ties_by_hand():
    id_s, ood_s = [1, 1, 1, 0], [1, 0, 0, 0]
    # pairs: each ID 1 beats three OOD 0 and ties one OOD 1; the ID 0 ties three, loses one
    assert M.auroc(id_s, ood_s) == 12 / 16
    assert M.fpr_at_tpr(id_s, ood_s) == 1.0  # TPR 3/4 at t=1, so t=0 and every OOD passes
    assert M.fpr_at_tpr(id_s, ood_s, rule="nearest") == 1.0
    # ROC points (0,0), (1/4, 3/4), (1, 1): interpolate at TPR 0.95 -> 1/4 + 0.8 * 3/4
    assert M.fpr_at_tpr(id_s, ood_s, rule="interp") == pytest.approx(0.85, abs=1e-15)
    # PR points (R, P): (3/4, 3/4), (1, 1/2)
    assert M.aupr(id_s, ood_s) == pytest.approx(3 / 4 * 3 / 4 + 1 / 4 * 1 / 2, abs=1e-15)
    assert M.aupr(id_s, ood_s, method="trapezoid") == pytest.approx(0.75 * 1.75 / 2 + 0.25 * 1.25 / 2, abs=1e-15)


def test_all_equal_scores():
    id_s, ood_s = torch.full((3,), 2.0), torch.full((2,), 2.0)
    r = M.ood_metrics(id_s, ood_s)
    assert r["auroc"] == 0.5
    assert r["fpr95"] == 1.0 and r["fpr95_ood_positive"] == 1.0
    assert r["aupr_in"] == pytest.approx(3 / 5) and r["aupr_out"] == pytest.approx(2 / 5)
    assert r["threshold"] == 2.0
    assert M.aupr(id_s, ood_s, method="trapezoid") == pytest.approx((1 + 3 / 5) / 2)
    assert M.fpr_at_tpr(id_s, ood_s, rule="interp") == pytest.approx(0.95)  # the diagonal (0,0)-(1,1)
    assert M.fpr_at_tpr(id_s, ood_s, rule="nearest") == 1.0


def test_perfectly_separated_both_ways():
    id_s, ood_s = np.array([3.0, 4.0, 5.0]), np.array([0.0, 1.0, 2.0])
    r = M.ood_metrics(id_s, ood_s)
    assert r == {"auroc": 1.0, "fpr95": 0.0, "aupr_in": 1.0, "aupr_out": 1.0, "threshold": 3.0,
                 "fpr95_ood_positive": 0.0, "n_id": 3, "n_ood": 3}
    for rule in M.RULES:
        assert M.fpr_at_tpr(id_s, ood_s, rule=rule) == 0.0
    flipped = M.ood_metrics(ood_s, id_s)
    assert flipped["auroc"] == 0.0 and flipped["fpr95"] == 1.0 and flipped["fpr95_ood_positive"] == 1.0


def test_single_id_score():
    id_s, ood_s = [0.5], [0.1, 0.5, 0.9, 0.2]
    assert M.auroc(id_s, ood_s) == 2.5 / 4  # beats 0.1 and 0.2, ties 0.5
    assert M.fpr_at_tpr(id_s, ood_s) == 2 / 4  # t = 0.5 keeps 0.5 and 0.9
    assert M.aupr(id_s, ood_s) == pytest.approx(1 / 3)  # its one point: precision 1/3 at recall 1
    assert M.fpr_at_tpr(id_s, ood_s, positive="ood") == 1.0  # catching 0.5 catches the ID score too


def test_single_ood_score():
    id_s, ood_s = [0.2, 0.4, 0.6, 0.8], [0.5]
    assert M.auroc(id_s, ood_s) == 0.5
    assert M.fpr_at_tpr(id_s, ood_s) == 1.0  # 95% of ID needs t = 0.2
    assert M.fpr_at_tpr(id_s, ood_s, positive="ood") == 2 / 4  # t = 0.5 catches ID 0.2 and 0.4
    assert M.aupr(id_s, ood_s, "ood") == pytest.approx(1 / 3)  # OOD ranks third from the bottom


def test_asymmetric_fpr95_conventions():
    """ID with a far low tail: keeping 95% of ID accepts every OOD, yet catching 95% of OOD
    rejects only the 10% of ID in that tail."""
    id_s = np.r_[np.full(90, 10.0), np.full(10, -10.0)]
    ood_s = np.zeros(100)
    r = M.ood_metrics(id_s, ood_s)
    assert r["fpr95"] == 1.0
    assert r["fpr95_ood_positive"] == 0.1
    assert r["auroc"] == 0.9
    assert r["threshold"] == -10.0


def test_nearest_rule_by_hand():
    # 20 ID scores: TPR = 19/20 = 0.95 exactly for every threshold in (1, 2]; the OOD scores
    # 1.5 and 1.2 make three thresholds with that TPR. "nearest" takes the lowest (MCM code),
    # "first" and "interp" the highest.
    id_s = np.arange(1.0, 21.0)
    ood_s = np.array([1.5, 1.2, 0.5, 3.5])
    assert M.fpr_at_tpr(id_s, ood_s, rule="nearest") == 3 / 4
    assert M.fpr_at_tpr(id_s, ood_s, rule="first") == 1 / 4
    assert M.fpr_at_tpr(id_s, ood_s, rule="interp") == 1 / 4
    # 10 ID scores: TPR 0.9 and 1.0 straddle 0.95; in float64 |0.9 - 0.95| < |1.0 - 0.95|
    id_s = np.arange(1.0, 11.0)
    ood_s = np.array([1.5, 5.5, 0.0, 1.0])
    assert M.fpr_at_tpr(id_s, ood_s, rule="nearest") == 2 / 4  # t = 1.5 (TPR 0.9)
    assert M.fpr_at_tpr(id_s, ood_s, rule="first") == 3 / 4  # t = 1 (TPR 1)
    # interp between (FPR 2/4, TPR 0.9) at t = 1.5 and (3/4, 1.0) at t = 1: halfway
    assert M.fpr_at_tpr(id_s, ood_s, rule="interp") == pytest.approx(0.625, abs=1e-12)


def test_interp_from_origin():
    # the first point already exceeds the level: interpolate from (0, 0)
    id_s, ood_s = [1.0, 1.0, 1.0, 1.0], [1.0, 0.0]
    assert M.fpr_at_tpr(id_s, ood_s, 0.95, rule="interp") == pytest.approx(0.95 * 0.5)


# ---------------------------------------------------------------------------------------------
# identities, input types, devices


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_identities(seed):
    id_s, ood_s = random_case(seed + 20, 37 + seed, 23, 6)
    for method in M.AUPR_METHODS:
        assert M.aupr(id_s, ood_s, "ood", method) == pytest.approx(M.aupr(-ood_s, -id_s, "id", method), rel=RTOL)
    assert M.auroc(ood_s, id_s) == pytest.approx(1 - M.auroc(id_s, ood_s), abs=1e-15)
    for rule in M.RULES:
        for level in (0.95, 0.5):
            assert M.fpr_at_tpr(id_s, ood_s, level, "ood", rule) == M.fpr_at_tpr(-ood_s, -id_s, level, "id", rule)
    r, swapped = M.ood_metrics(id_s, ood_s), M.ood_metrics(-ood_s, -id_s)
    assert r["aupr_out"] == pytest.approx(swapped["aupr_in"], rel=RTOL)
    assert r["fpr95_ood_positive"] == swapped["fpr95"]


def test_torch_numpy_and_dtypes_agree():
    id_s, ood_s = random_case(7, 301, 157, 11)
    expected = M.ood_metrics(id_s, ood_s)
    variants = [
        (torch.from_numpy(id_s), torch.from_numpy(ood_s)),
        (id_s.astype(np.float64), ood_s.astype(np.float64)),
        (torch.from_numpy(id_s).half(), torch.from_numpy(ood_s).half()),  # x.5 values are exact
        (torch.from_numpy(id_s).bfloat16(), torch.from_numpy(ood_s).bfloat16()),
        (torch.from_numpy(id_s), ood_s.astype(np.float64)),  # mixed: promoted to float64
        (list(map(float, id_s)), list(map(float, ood_s))),
        ((id_s * 2).astype(np.int64), (ood_s * 2).astype(np.int64)),  # integer scores, same ranking
    ]
    for a, b in variants:
        got = M.ood_metrics(a, b)
        doubled = isinstance(a, np.ndarray) and a.dtype == np.int64
        for key in expected:
            factor = 2 if key == "threshold" and doubled else 1
            assert got[key] == pytest.approx(expected[key] * factor, rel=RTOL), (key, type(a))


def test_inputs_not_modified_and_non_contiguous():
    base = torch.tensor([[3.0, 9.0], [1.0, 9.0], [2.0, 9.0]])
    id_s = base[:, 0]  # non-contiguous view
    ood_s = np.array([2.5, 0.5, 1.5])[::-1]  # negative stride
    before_id, before_ood = id_s.clone(), ood_s.copy()
    M.ood_metrics(id_s, ood_s)
    M.roc_curve(id_s, ood_s, positive="ood")
    assert torch.equal(id_s, before_id) and np.array_equal(ood_s, before_ood)
    assert M.auroc(id_s, ood_s) == pytest.approx(skm.roc_auc_score(*sk_inputs(id_s.numpy(), ood_s)))


def brute_auroc(id_s, ood_s) -> float:
    """P(id > ood) + ½ P(id = ood) over all pairs, with Python integers (exact for any int)."""
    wins = sum((a > b) * 2 + (a == b) for a in id_s for b in ood_s)
    return wins / (2 * len(id_s) * len(ood_s))


def test_uint64_scores_above_2_63_rank_exactly():
    big = 2**63
    id_s = [2**64 - 1, big + 1, big, 7]
    ood_s = [big, 5, big - 1, 2**64 - 2]
    want = brute_auroc(id_s, ood_s)
    for a, b in ((np.array(id_s, np.uint64), np.array(ood_s, np.uint64)),
                 (torch.tensor(id_s, dtype=torch.uint64), torch.tensor(ood_s, dtype=torch.uint64)),
                 (np.array(id_s, np.uint64), np.repeat(np.array(ood_s, np.uint64), 2)[::2])):  # strided view
        assert M.auroc(a, b) == want
    # mixed with non-negative int64 scores: compared exactly as unsigned integers
    assert M.auroc(np.array(id_s, np.uint64), np.array([5, big - 1], np.int64)) == brute_auroc(id_s, [5, big - 1])
    assert M.auroc(np.array([big + 1], np.uint64), np.array([big], np.uint64)) == 1.0
    _, _, thr = M.roc_curve(np.array(id_s, np.uint64), np.array(ood_s, np.uint64))
    assert thr[1] == float(2**64 - 1) and bool((thr[1:] > 0).all())
    with pytest.raises(ValueError, match="ood_scores negative") as info:
        M.auroc(np.array(id_s, np.uint64), np.array([-1], np.int64))
    assert info.value.param == "id_scores"


def test_int64_scores_beyond_2_53_are_exact_or_refused():
    big = 2**53
    id_s, ood_s = np.array([big + 1, big + 3], np.int64), np.array([big, big + 2], np.int64)
    # Same integer dtype: exact (float64 would round big+1 onto big and report ties).
    assert M.auroc(id_s, ood_s) == brute_auroc(id_s.tolist(), ood_s.tolist()) == 0.75
    assert M.auroc(id_s, torch.from_numpy(ood_s)) == 0.75
    assert M.auroc(id_s, np.array([3], np.int8)) == 1.0  # integer dtypes meet in int64
    # Integer beyond ±2**53 with floating scores: refused, naming the integer argument.
    with pytest.raises(ValueError, match="beyond ±2\\*\\*53") as info:
        M.auroc(id_s, ood_s.astype(np.float64))
    assert info.value.param == "id_scores"
    with pytest.raises(ValueError, match="ood_scores holds integer scores"):
        M.ood_metrics(np.array([0.5]), torch.tensor([-(2**60) - 1]))
    # Within ±2**53 integers and floats still mix (float64 holds them exactly).
    assert M.auroc(np.array([big], np.int64), np.array([big - 1.0])) == 1.0


def test_infinite_scores_rank():
    id_s = [float("inf"), 1.0, 2.0]
    ood_s = [float("-inf"), 1.0, 0.0]
    assert M.auroc(id_s, ood_s) == pytest.approx((3 + 2.5 + 3) / 9)


def test_accuracy_against_sklearn():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, 101)
    pred = np.where(rng.random(101) < 0.6, labels, rng.integers(0, 5, 101))
    assert M.accuracy(pred, labels) == skm.accuracy_score(labels, pred)
    assert M.accuracy(torch.from_numpy(pred), torch.from_numpy(labels).int()) == skm.accuracy_score(labels, pred)


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda: M.auroc([], [1.0]), ValueError, ["id_scores", "empty"]),
        (lambda: M.auroc([1.0], np.array([])), ValueError, ["ood_scores", "empty"]),
        (lambda: M.auroc([1.0, float("nan")], [1.0]), ValueError, ["id_scores", "NaN"]),
        (lambda: M.ood_metrics([1.0], torch.tensor([float("nan")])), ValueError, ["ood_scores", "NaN"]),
        (lambda: M.auroc(np.ones((2, 2)), [1.0]), ValueError, ["id_scores", "1-D", "(2, 2)"]),
        (lambda: M.auroc(torch.tensor(1.0), [1.0]), ValueError, ["id_scores", "1-D"]),
        (lambda: M.auroc(["a"], [1.0]), TypeError, ["id_scores", "dtype"]),
        (lambda: M.auroc(torch.ones(2, dtype=torch.complex64), [1.0]), TypeError, ["id_scores", "complex"]),
        (lambda: M.fpr_at_tpr([1.0], [0.0], positive="in"), ValueError, ["positive", "'in'"]),
        (lambda: M.fpr_at_tpr([1.0], [0.0], rule="closest"), ValueError, ["rule", "'closest'"]),
        (lambda: M.aupr([1.0], [0.0], method="auc"), ValueError, ["method", "'auc'"]),
        (lambda: M.aupr([1.0], [0.0], positive="x"), ValueError, ["positive"]),
        (lambda: M.fpr_at_tpr([1.0], [0.0], tpr=0.0), ValueError, ["tpr", "0.0"]),
        (lambda: M.ood_metrics([1.0], [0.0], tpr=1.5), ValueError, ["tpr", "1.5"]),
        (lambda: M.ood_metrics([1.0], [0.0], tpr=float("nan")), ValueError, ["tpr"]),
        (lambda: M.accuracy([0.5], [0]), TypeError, ["pred", "integer"]),
        (lambda: M.accuracy([0, 1], [0]), ValueError, ["labels", "(2,)"]),
        (lambda: M.accuracy([], []), ValueError, ["pred", "empty"]),
    ],
)
def test_bad_input_names_the_argument(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value)


def test_public_module_name():
    assert dk.metrics is M and "metrics" in dk.__all__
