"""Exact, tie-aware OOD-detection metrics (docs/conventions.md §5).

Scores are "higher = in-distribution". Every metric is computed from one sort of the
concatenated ID and OOD scores: the ROC curve has one point per *distinct* score (ties are
grouped exactly, the curve is never thinned), counts are int64 and every rate is float64.
Inputs may be torch tensors (they stay on their device, so CUDA scores are sorted on the GPU)
or numpy arrays / sequences (wrapped without a copy where possible). Inputs are never modified.

Conventions (the OOD literature uses several; each one is named by an argument):

* ``auroc``: P(id > ood) + ½ P(id = ood), identical to scikit-learn's ``roc_auc_score`` with
  ID labelled 1. Computed in exact integer arithmetic, so it is correctly rounded.
* ``fpr_at_tpr`` with ``positive="id"`` (CLIP/MCM papers): keep ``tpr`` of the ID scores,
  report the fraction of OOD scores accepted. ``positive="ood"`` (OpenOOD v1.5): catch ``tpr``
  of the OOD scores (lowest scores first), report the fraction of ID scores rejected.
* ``rule``: ``"first"`` the highest threshold reaching ``tpr``; ``"nearest"`` the threshold
  whose TPR is nearest ``tpr`` (the MCM / Hendrycks ``fpr_and_fdr_at_recall`` procedure);
  ``"interp"`` linear interpolation on the ROC curve (CLIPN).
* ``aupr``: average precision (scikit-learn's ``average_precision_score``) or the trapezoid
  area under the precision-recall curve (scikit-learn's ``auc(recall, precision)``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

from deltakern.core.errors import InvalidArgument, InvalidArgumentType
from deltakern.core.validation import check_choice, check_finite_number

ArrayLike = Union[torch.Tensor, np.ndarray, Any]

POSITIVES = ("id", "ood")
RULES = ("first", "nearest", "interp")
AUPR_METHODS = ("ap", "trapezoid")

__all__ = [
    "accuracy",
    "aupr",
    "auroc",
    "fpr_at_tpr",
    "ood_metrics",
    "roc_curve",
]


# ----------------------------------------------------------------------------------------------
# input handling


def _as_tensor(name: str, x: object) -> torch.Tensor:
    """Wrap ``x`` as a tensor without copying where possible (never written to)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    arr = np.asarray(x)
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise InvalidArgumentType(f"{name} must hold real numbers (a torch tensor or numpy array), got dtype {arr.dtype}")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype.kind == "u" and 1 < arr.dtype.itemsize < 8:
        arr = arr.astype(np.int64)  # exact; torch lacks sorting for wide unsigned types
    if arr.strides and any(s < 0 for s in arr.strides):
        arr = np.ascontiguousarray(arr)
    with warnings.catch_warnings():
        # Read-only arrays (np.load with mmap_mode="r") are fine: the metrics never write.
        warnings.simplefilter("ignore", UserWarning)
        return torch.as_tensor(arr)


def _check_scores(name: str, x: object) -> torch.Tensor:
    """A non-empty 1-D real tensor without NaN (±inf are allowed: they still rank)."""
    t = _as_tensor(name, x)
    if t.is_complex():
        raise InvalidArgumentType(f"{name} must hold real scores, got dtype {t.dtype}")
    if t.dim() != 1:
        raise InvalidArgument(f"{name} must be 1-D [n], got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise InvalidArgument(f"{name} must hold at least one score, got an empty array")
    if t.dtype == torch.bool:
        t = t.to(torch.int8)
    if t.dtype in _NARROW_UNSIGNED:
        t = t.to(torch.int64)  # exact
    if t.dtype == torch.uint64 and not bool((t.view(torch.int64) < 0).any()):
        t = t.view(torch.int64)  # every value < 2**63: the same bits as int64
    # A uint64 tensor left here holds a value >= 2**63; it is ranked through its bit pattern.
    if t.is_floating_point() and bool(torch.isnan(t).any()):
        count = int(torch.isnan(t).sum())
        raise InvalidArgument(f"{name} must not contain NaN, got {count} NaN value(s) among {t.numel()}")
    return t


_NARROW_UNSIGNED = tuple(getattr(torch, name) for name in ("uint16", "uint32") if hasattr(torch, name))
_INT64_MIN = -(2**63)
#: Integers up to this magnitude are exact in float64; larger ones may round onto a neighbour.
_FLOAT64_EXACT_INT = 2**53


def _beyond_float64(t: torch.Tensor) -> bool:
    """Whether an integer score tensor holds a value float64 may not represent exactly."""
    if t.dtype == torch.uint64:
        return True  # holds a value >= 2**63 (smaller ones were read as int64)
    if t.dtype != torch.int64:
        return False
    return bool(((t > _FLOAT64_EXACT_INT) | (t < -_FLOAT64_EXACT_INT)).any())


def _check_tpr(tpr: object) -> float:
    tpr = check_finite_number("tpr", tpr)
    if not 0.0 < tpr <= 1.0:
        raise InvalidArgument(f"tpr must lie in (0, 1], got {tpr}")
    return tpr


def _common(id_scores: torch.Tensor, ood_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One dtype for both inputs in which every value keeps its exact order, or an error.

    Floats of different types meet in float64 (exact). Integers meet in int64, or in uint64 when
    one side holds values >= 2**63 and the other no negative value (exact). An integer meets a
    float in float64 only when every integer is at most 2**53 in magnitude: beyond that float64
    would merge distinct scores into ties, so the call is refused.
    """
    names = ("id_scores", "ood_scores")
    if id_scores.device != ood_scores.device:
        raise InvalidArgument(
            f"id_scores and ood_scores must be on the same device: id_scores on {id_scores.device}, "
            f"ood_scores on {ood_scores.device}"
        )
    if id_scores.dtype == ood_scores.dtype:
        return id_scores, ood_scores
    pair = (id_scores, ood_scores)
    floating = [t.is_floating_point() for t in pair]
    if not any(floating):
        if torch.uint64 not in (id_scores.dtype, ood_scores.dtype):
            return id_scores.to(torch.int64), ood_scores.to(torch.int64)
        big, other = (0, 1) if id_scores.dtype == torch.uint64 else (1, 0)
        if bool((pair[other] < 0).any()):
            raise InvalidArgument(
                f"{names[big]} holds unsigned scores >= 2**63 and {names[other]} negative scores: no "
                f"integer type holds both exactly; convert them to one dtype yourself", param=names[big]
            )
        return tuple(t if t.dtype == torch.uint64 else t.to(torch.int64).view(torch.uint64) for t in pair)
    for i, t in enumerate(pair):
        if not floating[i] and _beyond_float64(t):
            raise InvalidArgument(
                f"{names[i]} holds integer scores beyond ±2**53 while {names[1 - i]} is floating "
                f"({pair[1 - i].dtype}): float64 cannot compare them exactly (distinct scores would tie); "
                f"pass both as integers or both as floats", param=names[i],
            )
    # float64 holds every value of the narrower float types and these integers exactly.
    return id_scores.to(torch.float64), ood_scores.to(torch.float64)


# ----------------------------------------------------------------------------------------------
# the ROC curve at distinct thresholds


def _descending_keys(scores: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Integer keys whose ascending order is the scores' descending order, and their decoder.

    Integer sorting is exact and takes PyTorch's radix-sort path on CPU (several times faster
    than sorting floats). A float's bit pattern read as a signed integer is monotone once the
    magnitude bits of negative values are flipped; ``+ 0.0`` maps -0.0 to +0.0 so equal scores
    get equal keys. float16/bfloat16 are widened to float32 first (exactly).
    """
    if scores.is_floating_point():
        float_t, int_t = (torch.float64, torch.int64) if scores.dtype == torch.float64 else (torch.float32, torch.int32)
        shift = 8 * torch.empty((), dtype=int_t).element_size() - 1
        mask = (1 << shift) - 1

        def flip(bits: torch.Tensor) -> torch.Tensor:  # an involution on the bit patterns
            return bits ^ ((bits >> shift) & mask)

        bits = (scores.to(float_t) + 0.0).view(int_t)
        return ~flip(bits), lambda keys: flip(~keys).view(float_t).to(torch.float64)
    if scores.dtype == torch.uint64:
        # Flipping the top bit maps [0, 2**64) onto [-2**63, 2**63) in order, exactly.
        return ~(scores.view(torch.int64) ^ _INT64_MIN), lambda keys: (
            (~keys ^ _INT64_MIN).view(torch.uint64).to(torch.float64)
        )
    return ~scores.to(torch.int64), lambda keys: (~keys).to(torch.float64)


@dataclass(frozen=True)
class RocCurve:
    """Cumulative counts at every distinct score, thresholds in decreasing order.

    ``tp[g]`` positives and ``fp[g]`` negatives have a score ``>= thresholds[g]`` (int64);
    for ``positive="ood"`` the scores were negated, so ``thresholds`` are negated scores.
    The implicit point (0, 0) (threshold +inf) is not stored. Thresholds are kept as sort keys
    and decoded only where needed.
    """

    keys: torch.Tensor  # [G] sort keys of the distinct scores (see _descending_keys)
    decode: Callable[[torch.Tensor], torch.Tensor]
    sign: float  # -1.0 when the scores were negated
    tp: torch.Tensor  # [G] int64, nondecreasing, ends at n_pos
    fp: torch.Tensor  # [G] int64, nondecreasing, ends at n_neg
    n_pos: int
    n_neg: int

    @property
    def thresholds(self) -> torch.Tensor:
        """[G] float64, strictly decreasing."""
        return self.sign * self.decode(self.keys)

    def threshold(self, g: int) -> float:
        return float(self.sign * self.decode(self.keys[g : g + 1])[0])

    @property
    def tpr(self) -> torch.Tensor:
        return self.tp.to(torch.float64) / self.n_pos

    @property
    def fpr(self) -> torch.Tensor:
        return self.fp.to(torch.float64) / self.n_neg

    def previous(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tp, fp)`` of the point before each point (0 before the first)."""
        zero = self.tp.new_zeros(1)
        return torch.cat([zero, self.tp[:-1]]), torch.cat([zero, self.fp[:-1]])

    def swapped(self) -> "RocCurve":
        """The curve with the roles swapped and the scores negated (no new sort needed)."""
        tp_prev, fp_prev = self.previous()
        return RocCurve(
            keys=self.keys.flip(0),
            decode=self.decode,
            sign=-self.sign,
            # negatives / positives with a score <= each threshold, lowest threshold first
            tp=(self.n_neg - fp_prev).flip(0),
            fp=(self.n_pos - tp_prev).flip(0),
            n_pos=self.n_neg,
            n_neg=self.n_pos,
        )


def _id_curve(id_scores: torch.Tensor, ood_scores: torch.Tensor) -> RocCurve:
    """One sort of both sets; ID is the positive class."""
    id_scores, ood_scores = _common(id_scores, ood_scores)
    n_id, n_ood = id_scores.numel(), ood_scores.numel()
    keys, decode = _descending_keys(torch.cat([id_scores, ood_scores]))
    keys, order = torch.sort(keys)
    # The first n_id positions of the concatenation are ID: no label array needs gathering.
    is_id = order < n_id
    del order
    # The last position of every group of equal scores is where the curve has a point.
    ends = torch.nonzero(keys[1:] != keys[:-1]).squeeze(1)
    ends = torch.cat([ends, ends.new_full((1,), n_id + n_ood - 1)])
    # int32 prefix sums are exact below 2^31 elements and faster than int64.
    count_dtype = torch.int32 if n_id + n_ood < 2**31 else torch.int64
    tp = torch.cumsum(is_id, 0, dtype=count_dtype)
    if ends.numel() < keys.numel():  # ties: keep the last position of each group
        tp, keys = tp.index_select(0, ends), keys.index_select(0, ends)
    tp = tp.to(torch.int64)
    return RocCurve(keys=keys, decode=decode, sign=1.0, tp=tp, fp=ends + 1 - tp, n_pos=n_id, n_neg=n_ood)


def _curve(id_scores, ood_scores, positive: str) -> RocCurve:
    curve = _id_curve(_check_scores("id_scores", id_scores), _check_scores("ood_scores", ood_scores))
    return curve if positive == "id" else curve.swapped()


def roc_curve(
    id_scores: ArrayLike, ood_scores: ArrayLike, positive: str = "id"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The full ROC curve ``(fpr, tpr, thresholds)``, float64, one point per distinct score.

    (0, 0) with threshold ``+inf`` is prepended, as in scikit-learn's ``roc_curve`` with
    ``drop_intermediate=False``. ``positive="ood"`` returns the curve for negated scores
    (a point is "OOD" when its score is ``<= -threshold``).
    """
    positive = check_choice("positive", positive, POSITIVES)
    curve = _curve(id_scores, ood_scores, positive)
    first = curve.thresholds.new_full((1,), float("inf"))
    zero = curve.thresholds.new_zeros(1)
    return (
        torch.cat([zero, curve.fpr]),
        torch.cat([zero, curve.tpr]),
        torch.cat([first, curve.thresholds]),
    )


# ----------------------------------------------------------------------------------------------
# metrics on a curve


def _auroc(curve: RocCurve) -> float:
    """Trapezoid area in exact integer arithmetic: sum of dFP * (TP_prev + TP) over 2 P N."""
    zero = curve.tp.new_zeros(1)
    d_fp = torch.diff(curve.fp, prepend=zero)
    tp_prev = torch.cat([zero, curve.tp[:-1]])
    denominator = 2 * curve.n_pos * curve.n_neg
    if denominator < 2**62:  # every partial sum is bounded by the denominator: no overflow
        numerator = int((d_fp * (tp_prev + curve.tp)).sum())
        return numerator / denominator  # Python int division is correctly rounded
    area = (d_fp.to(torch.float64) * (tp_prev + curve.tp).to(torch.float64)).sum()
    return float(area) / denominator


def _fpr_at(curve: RocCurve, tpr: float, rule: str) -> tuple[float, float]:
    """(FPR, threshold) at the operating point ``rule`` picks for ``tpr``."""
    rates = curve.tpr
    # First point with TPR >= tpr; it exists because the last point has TPR = 1 >= tpr.
    first = int(torch.searchsorted(rates, torch.tensor([tpr], dtype=torch.float64, device=rates.device)))
    if rule == "first":
        return int(curve.fp[first]) / curve.n_neg, curve.threshold(first)
    if rule == "nearest":
        # Candidates: every threshold down to the first one reaching TPR = 1 (the lowest
        # positive score). Among equal distances the lowest candidate threshold wins, which is
        # what the MCM / Hendrycks fpr_and_fdr_at_recall code returns.
        full = int(torch.searchsorted(curve.tp, curve.tp.new_tensor([curve.n_pos])))
        distance = (rates[: full + 1] - tpr).abs()
        best = distance.min()
        pick = int(torch.nonzero(distance == best)[-1])
        return int(curve.fp[pick]) / curve.n_neg, curve.threshold(pick)
    # rule == "interp": between the point before `first` (or the (0, 0) origin) and `first`.
    tpr_hi, fpr_hi = float(rates[first]), int(curve.fp[first]) / curve.n_neg
    if first == 0:
        tpr_lo, fpr_lo = 0.0, 0.0
    else:
        tpr_lo, fpr_lo = float(rates[first - 1]), int(curve.fp[first - 1]) / curve.n_neg
    if tpr_hi == tpr:
        return fpr_hi, curve.threshold(first)
    weight = (tpr - tpr_lo) / (tpr_hi - tpr_lo)
    return fpr_lo + weight * (fpr_hi - fpr_lo), curve.threshold(first)


def _average_precision(curve: RocCurve) -> float:
    """sum over thresholds of (R_g - R_{g-1}) * P_g, the step integral of scikit-learn."""
    zero = curve.tp.new_zeros(1)
    d_tp = torch.diff(curve.tp, prepend=zero).to(torch.float64)
    precision = curve.tp.to(torch.float64) / (curve.tp + curve.fp).to(torch.float64)
    return float((d_tp * precision).sum()) / curve.n_pos


def _trapezoid_pr(curve: RocCurve) -> float:
    """Trapezoid area under (recall, precision) with the point (0, 1) prepended."""
    one = curve.tp.new_ones(1).to(torch.float64)
    zero = torch.zeros_like(one)
    recall = torch.cat([zero, curve.tpr])
    precision = torch.cat([one, curve.tp.to(torch.float64) / (curve.tp + curve.fp).to(torch.float64)])
    return float((torch.diff(recall) * (precision[1:] + precision[:-1])).sum()) / 2.0


def _aupr(curve: RocCurve, method: str) -> float:
    return _average_precision(curve) if method == "ap" else _trapezoid_pr(curve)


# ----------------------------------------------------------------------------------------------
# public API


def auroc(id_scores: ArrayLike, ood_scores: ArrayLike) -> float:
    """Area under the ROC curve: P(id > ood) + ½·P(id = ood), in [0, 1].

    Equals scikit-learn's ``roc_auc_score(labels, scores)`` with ID labelled 1; computed in
    exact integer arithmetic from one sort.
    """
    return _auroc(_curve(id_scores, ood_scores, "id"))


def fpr_at_tpr(
    id_scores: ArrayLike,
    ood_scores: ArrayLike,
    tpr: float = 0.95,
    positive: str = "id",
    rule: str = "first",
) -> float:
    """False-positive rate at a true-positive rate of ``tpr`` (FPR95 for the default 0.95).

    ``positive="id"``: the threshold keeps at least ``tpr`` of the ID scores (score >= t) and
    the result is the fraction of OOD scores also kept. ``positive="ood"`` (OpenOOD v1.5): the
    roles and the sign of the scores are swapped: catch ``tpr`` of the OOD scores (score <= t),
    report the fraction of ID scores caught with them.

    ``rule``: ``"first"`` the highest threshold whose TPR reaches ``tpr``; ``"nearest"`` the
    threshold whose TPR (``tp / n_pos`` in float64) is nearest ``tpr``, among the thresholds
    down to the lowest positive score, equal distances going to the lower threshold (exactly
    the MCM / Hendrycks ``fpr_and_fdr_at_recall`` procedure); ``"interp"`` linear interpolation
    on the full ROC curve (with (0, 0) prepended) between the last point whose TPR is below
    ``tpr`` and the first point reaching it (CLIPN).
    """
    tpr = _check_tpr(tpr)
    positive = check_choice("positive", positive, POSITIVES)
    rule = check_choice("rule", rule, RULES)
    return _fpr_at(_curve(id_scores, ood_scores, positive), tpr, rule)[0]


def aupr(id_scores: ArrayLike, ood_scores: ArrayLike, positive: str = "id", method: str = "ap") -> float:
    """Area under the precision-recall curve with the ``positive`` class as the one detected.

    ``positive="id"`` gives AUPR-In, ``"ood"`` AUPR-Out (scores negated, so low scores are
    detected first). ``method="ap"``: average precision, equal to scikit-learn's
    ``average_precision_score``; ``"trapezoid"``: the trapezoid area with the point
    (recall 0, precision 1) prepended, equal to ``auc(recall, precision)`` of scikit-learn's
    ``precision_recall_curve``.
    """
    positive = check_choice("positive", positive, POSITIVES)
    method = check_choice("method", method, AUPR_METHODS)
    return _aupr(_curve(id_scores, ood_scores, positive), method)


def ood_metrics(id_scores: ArrayLike, ood_scores: ArrayLike, tpr: float = 0.95) -> dict[str, float | int]:
    """Every standard OOD metric from one sort.

    Keys: ``auroc``; ``fpr95`` (FPR at ``tpr``, ID positive, rule "first"); ``aupr_in`` and
    ``aupr_out`` (average precision with ID / OOD positive); ``threshold`` (the score threshold
    behind ``fpr95``: a score ``>= threshold`` is called ID); ``fpr95_ood_positive`` (OpenOOD
    v1.5: fraction of ID rejected when ``tpr`` of the OOD is caught); ``n_id``; ``n_ood``.
    """
    tpr = _check_tpr(tpr)
    id_curve = _curve(id_scores, ood_scores, "id")
    ood_curve = id_curve.swapped()
    fpr, threshold = _fpr_at(id_curve, tpr, "first")
    return {
        "auroc": _auroc(id_curve),
        "fpr95": fpr,
        "aupr_in": _average_precision(id_curve),
        "aupr_out": _average_precision(ood_curve),
        "threshold": threshold,
        "fpr95_ood_positive": _fpr_at(ood_curve, tpr, "first")[0],
        "n_id": id_curve.n_pos,
        "n_ood": id_curve.n_neg,
    }


def accuracy(pred: ArrayLike, labels: ArrayLike) -> float:
    """Top-1 accuracy: the fraction of rows whose predicted class equals the label."""
    pred_t, labels_t = _as_tensor("pred", pred), _as_tensor("labels", labels)
    for name, t in (("pred", pred_t), ("labels", labels_t)):
        if t.dim() != 1:
            raise InvalidArgument(f"{name} must be 1-D [n], got shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise InvalidArgument(f"{name} must hold at least one class index, got an empty array")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise InvalidArgumentType(f"{name} must hold integer class indices, got dtype {t.dtype}")
    if pred_t.shape != labels_t.shape:
        raise InvalidArgument(f"labels must have shape {tuple(pred_t.shape)} to match pred, got {tuple(labels_t.shape)}")
    if pred_t.device != labels_t.device:
        raise InvalidArgument(f"pred and labels must be on the same device: pred on {pred_t.device}, labels on {labels_t.device}")
    correct = int((pred_t.to(torch.int64) == labels_t.to(torch.int64)).sum())
    return correct / pred_t.numel()
