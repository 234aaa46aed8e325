"""Compare every score of an ID set against one or more OOD sets.

Two steps, usable on their own:

1. :func:`score_columns` scores embeddings once per set (one fused pass for ΔEnergy in both
   modes, energy, MSP, max-logit and the top-c terms; one more pass for MCM at its own
   temperature) and returns a ``{score name: tensor}`` dict, including ΔEnergy for every
   c' = 1..C as ``"delta_energy@c=K"`` / ``"delta_energy_joint@c=K"``.
2. :func:`evaluate_sets` computes :func:`deltakern.metrics.ood_metrics` for every
   (score, OOD set) pair and returns an :class:`Evaluation` with the tables (text, JSON-ready
   dicts, CSV rows).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from deltakern import metrics
from deltakern.core.errors import InvalidArgument
from deltakern.core.validation import check_choice, check_int_range, check_tensor

# The scores of the main table, in display order, with their display names.
SCORE_LABELS = {
    "delta_energy": "ΔEnergy (separate)",
    "delta_energy_joint": "ΔEnergy (joint)",
    "energy": "Energy",
    "msp": "MSP",
    "mcm": "MCM",
    "max_logit": "Max-logit",
}
# Optional baselines that need inputs beyond X and W (labels for the table only).
EXTRA_LABELS = {"knn": "KNN (k-th NN)", "neglabel": "NegLabel"}


def score_label(score: str) -> str:
    """The display name of a score column (the column name itself when unknown)."""
    return SCORE_LABELS.get(score) or EXTRA_LABELS.get(score, score)
SWEEP_BASES = ("delta_energy", "delta_energy_joint")
_SWEEP = re.compile(r"^(?P<base>.+)@c=(?P<c>\d+)$")
METRIC_COLUMNS = ("auroc", "fpr95", "aupr_in", "aupr_out")
MEAN_SET = "mean"

CONVENTIONS = {
    "score_direction": "higher = in-distribution for every score",
    "auroc": "P(id > ood) + 0.5 P(id = ood); sklearn roc_auc_score with ID labelled 1",
    "fpr95": "fraction of OOD scores >= t, t the highest threshold keeping >= 95% of ID (ID positive, "
    "rule 'first', full ROC curve with one point per distinct score, never thinned)",
    "fpr95_ood_positive": "OpenOOD v1.5: fraction of ID scores <= t, t the lowest threshold catching "
    ">= 95% of OOD (OOD positive, scores negated)",
    "aupr_in": "average precision with ID positive (sklearn average_precision_score)",
    "aupr_out": "average precision with OOD positive and scores negated",
    "threshold": "the score threshold behind fpr95: score >= threshold is called ID",
    "mean": "unweighted mean of each metric over the OOD sets",
    "delta_energy@c=K": "separate mode: sum of the first K per-rank terms; joint mode: the top-1..K joint "
    "reset, both from the same pass with c = C",
}


def sweep_name(base: str, c: int) -> str:
    """Column name of ΔEnergy for c' = ``c`` (``"delta_energy@c=2"``)."""
    return f"{base}@c={c}"


def delta_energy_by_c(terms: torch.Tensor, mode: str) -> torch.Tensor:
    """``[N, C]`` ΔEnergy for every c' = 1..C from ``Scores.delta_energy_terms`` of one pass.

    Separate mode: column c' is the sum of the first c' terms. Joint mode: each term already
    is the joint value for the top-1..c' reset.
    """
    check_choice("mode", mode, ("separate", "joint"))
    if mode == "joint":
        return terms
    # float64 prefix sums, back to the terms' dtype (no drift for large c)
    return torch.cumsum(terms.to(torch.float64), dim=1).to(terms.dtype)


def columns_from_scores(separate, joint, mcm_scores: torch.Tensor) -> dict[str, torch.Tensor]:
    """Score columns from ``dk.score_modes`` output (both modes of one pass) and MCM scores."""
    cols = {
        "delta_energy": separate.delta_energy,
        "delta_energy_joint": joint.delta_energy,
        "energy": separate.energy,
        "msp": separate.msp,
        "mcm": mcm_scores,
        "max_logit": separate.max_logit,
    }
    for base, result, mode in (("delta_energy", separate, "separate"), ("delta_energy_joint", joint, "joint")):
        by_c = delta_energy_by_c(result.delta_energy_terms, mode)
        for j in range(by_c.shape[1]):
            cols[sweep_name(base, j + 1)] = by_c[:, j]
    cols["pred"] = separate.pred
    if separate.neglabel is not None:
        cols["neglabel"] = separate.neglabel
    return cols


def score_columns(
    X: torch.Tensor,
    W: torch.Tensor,
    *,
    temperature: float = 0.01,
    c: int = 1,
    reset: float = 0.0,
    backend: str = "auto",
    mcm_temperature: float = 1.0,
    chunk_rows: int = 65_536,
    desc: str | None = None,
    progress: bool = True,
    negatives: torch.Tensor | None = None,
    negative_groups: int = 1,
    matmul_precision: str = "highest",
) -> dict[str, torch.Tensor]:
    """Score ``X [N, D]`` against ``W [K, D]`` and return every score column (see module doc).

    With ``negatives [M, D]`` (negative-label embeddings) the ``"neglabel"`` column comes from the
    same calls (docs/conventions.md §2.5). ``matmul_precision`` is :func:`deltakern.score`'s
    (docs/conventions.md §3.4).

    Rows are processed in chunks of ``chunk_rows`` with a progress bar; results are float32 on
    the CPU (``"pred"`` int64). ``X`` stays where it is; each chunk is moved to ``W``'s device.
    """
    from tqdm import tqdm

    from deltakern.scoring import mcm, score_modes

    X = check_tensor("X", X)
    W = check_tensor("W", W)
    chunk_rows = check_int_range("chunk_rows", chunk_rows, 1, 2**62)
    parts: dict[str, list[torch.Tensor]] = {}
    # An empty X still makes one call, so dk.score reports it with its usual message.
    starts = range(0, max(X.shape[0] if X.dim() else 0, 1), chunk_rows)
    for start in tqdm(starts, desc=desc, unit="chunk", disable=not progress or len(starts) < 2):
        block = (X[start : start + chunk_rows] if X.dim() else X).to(W.device)
        modes = score_modes(
            block, W, temperature=temperature, c=c, reset=reset, backend=backend, negatives=negatives,
            negative_groups=negative_groups, matmul_precision=matmul_precision,
        )
        mcm_block = mcm(block, W, temperature=mcm_temperature, backend=backend, matmul_precision=matmul_precision)
        for name, value in columns_from_scores(modes["separate"], modes["joint"], mcm_block).items():
            parts.setdefault(name, []).append(value.cpu())
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


@dataclass(frozen=True)
class Evaluation:
    """Metrics of every (score, OOD set) pair.

    ``rows``: one dict per (score, OOD set) with the keys of
    :func:`deltakern.metrics.ood_metrics` plus ``score`` and ``ood_set``; ``means``: one
    per score with ``ood_set == "mean"``. ``positive`` picks which FPR95 the tables show.
    ``id_scores`` / ``ood_scores`` are the inputs (kept for plots, not copied).
    """

    rows: list[dict[str, Any]]
    means: list[dict[str, Any]]
    scores: list[str]
    ood_sets: list[str]
    positive: str = "id"
    tpr: float = 0.95
    id_accuracy: float | None = None
    id_scores: Mapping[str, Any] = field(default_factory=dict, repr=False)
    ood_scores: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, repr=False)

    # -- selections ----------------------------------------------------------------------------

    def main_scores(self) -> list[str]:
        return [s for s in self.scores if not _SWEEP.match(s)]

    def sweep_scores(self) -> list[str]:
        return [s for s in self.scores if _SWEEP.match(s)]

    def fpr_key(self) -> str:
        return "fpr95" if self.positive == "id" else "fpr95_ood_positive"

    def fpr_label(self) -> str:
        pct = f"{100 * self.tpr:g}"
        return f"FPR{pct}↓ (ID+)" if self.positive == "id" else f"FPR{pct}↓ (OOD+)"

    def result(self, score: str, ood_set: str) -> dict[str, Any]:
        """The metrics dict of one (score, OOD set) pair (``ood_set="mean"`` for the mean)."""
        for row in self.rows + self.means:
            if row["score"] == score and row["ood_set"] == ood_set:
                return row
        raise KeyError(f"no result for score={score!r}, ood_set={ood_set!r}")

    # -- tables --------------------------------------------------------------------------------

    def table_rows(self, scores: list[str] | None = None) -> list[list[Any]]:
        """Rows ``[score, OOD set, AUROC, FPR, AUPR-In, AUPR-Out]`` in percent, means last per score."""
        fpr = self.fpr_key()
        out = []
        for score in scores if scores is not None else self.main_scores():
            sets = self.ood_sets + ([MEAN_SET] if len(self.ood_sets) > 1 else [])
            for name in sets:
                r = self.result(score, name)
                out.append(
                    [score_label(score), name]
                    + [100 * r[k] for k in ("auroc", fpr, "aupr_in", "aupr_out")]
                )
        return out

    def headers(self) -> list[str]:
        return ["score", "OOD set", "AUROC↑", self.fpr_label(), "AUPR-In↑", "AUPR-Out↑"]

    def table(self, tablefmt: str = "simple", floatfmt: str = ".2f", accuracy: bool = True) -> str:
        """The main table (percent) as text; ``tablefmt`` is any tabulate format. With
        ``accuracy`` and ID labels, a line with the ID top-1 accuracy follows."""
        from tabulate import tabulate

        text = tabulate(self.table_rows(), headers=self.headers(), tablefmt=tablefmt, floatfmt=floatfmt)
        if accuracy and self.id_accuracy is not None:
            text += f"\nID top-1 accuracy: {100 * self.id_accuracy:.2f}%"
        return text

    def c_table_rows(self) -> list[list[Any]]:
        """ΔEnergy for c' = 1..C: rows ``[mode, c, AUROC, FPR, AUPR-In, AUPR-Out]``, mean over sets."""
        fpr = self.fpr_key()
        out = []
        for score in self.sweep_scores():
            match = _SWEEP.match(score)
            base, c = match["base"], int(match["c"])
            r = self.result(score, MEAN_SET)
            out.append([score_label(base), c] + [100 * r[k] for k in ("auroc", fpr, "aupr_in", "aupr_out")])
        return out

    def c_table(self, tablefmt: str = "simple", floatfmt: str = ".2f") -> str:
        """The effect of c on ΔEnergy (mean over the OOD sets, percent); empty without sweep columns."""
        from tabulate import tabulate

        rows = self.c_table_rows()
        if not rows:
            return ""
        headers = ["ΔEnergy mode", "c"] + self.headers()[2:]
        return tabulate(rows, headers=headers, tablefmt=tablefmt, floatfmt=floatfmt)

    def records(self) -> list[dict[str, Any]]:
        """Flat records (one per score × OOD set, then the means) for CSV/JSON."""
        return [dict(r) for r in self.rows + self.means]

    def to_dict(self) -> dict[str, Any]:
        return {
            "tpr": self.tpr,
            "positive": self.positive,
            "fpr_column": self.fpr_key(),
            "scores": list(self.scores),
            "ood_sets": list(self.ood_sets),
            "id_accuracy": self.id_accuracy,
            "results": [dict(r) for r in self.rows],
            "means": [dict(r) for r in self.means],
            "conventions": dict(CONVENTIONS),
        }


def _mean_row(score: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    mean = {"score": score, "ood_set": MEAN_SET}
    for key in ("auroc", "fpr95", "aupr_in", "aupr_out", "fpr95_ood_positive"):
        mean[key] = math.fsum(r[key] for r in rows) / len(rows)
    mean["n_id"] = rows[0]["n_id"]
    mean["n_ood"] = sum(r["n_ood"] for r in rows)
    return mean


def evaluate_sets(
    id_scores: Mapping[str, Any],
    ood_scores: Mapping[str, Mapping[str, Any]],
    *,
    tpr: float = 0.95,
    positive: str = "id",
    id_pred: Any = None,
    id_labels: Any = None,
    scores: list[str] | None = None,
    progress: bool = False,
) -> Evaluation:
    """Evaluate every score of the ID set against every OOD set.

    ``id_scores``: ``{score name: [N_id] scores}``; ``ood_scores``: ``{OOD set name: {score
    name: [N_ood] scores}}`` (torch tensors or numpy arrays, higher = ID). ``scores`` restricts
    and orders the scores compared (default: the ID dict's keys, except ``"pred"``); every OOD
    set must have them all. ``positive`` ("id" or "ood") picks the FPR95 convention the text
    tables show (both are always computed). With ``id_pred`` and ``id_labels`` the ID top-1
    accuracy is reported. Names of the form ``"BASE@c=K"`` form the c-effect table.
    """
    positive = check_choice("positive", positive, metrics.POSITIVES)
    if not ood_scores:
        raise InvalidArgument("ood_scores must name at least one OOD set, got none")
    names = [s for s in (scores if scores is not None else list(id_scores)) if s != "pred"]
    if not names:
        raise InvalidArgument("id_scores must hold at least one score, got none")
    for name in names:
        if name not in id_scores:
            raise InvalidArgument(f"id_scores has no score {name!r}; it holds {sorted(id_scores)}")
        for set_name, cols in ood_scores.items():
            if name not in cols:
                raise InvalidArgument(f"ood_scores[{set_name!r}] has no score {name!r}; it holds {sorted(cols)}")

    from tqdm import tqdm

    rows, means = [], []
    pairs = [(s, o) for s in names for o in ood_scores]
    results: dict[tuple[str, str], dict] = {}
    for score, set_name in tqdm(pairs, desc="metrics", unit="pair", disable=not progress):
        r = metrics.ood_metrics(id_scores[score], ood_scores[set_name][score], tpr=tpr)
        results[(score, set_name)] = {"score": score, "ood_set": set_name, **r}
    for score in names:
        score_rows = [results[(score, o)] for o in ood_scores]
        rows.extend(score_rows)
        means.append(_mean_row(score, score_rows))

    accuracy = None
    if id_pred is not None or id_labels is not None:
        if id_pred is None or id_labels is None:
            raise InvalidArgument("id_pred and id_labels must be given together to report ID accuracy")
        accuracy = metrics.accuracy(id_pred, id_labels)
    return Evaluation(
        rows=rows,
        means=means,
        scores=names,
        ood_sets=list(ood_scores),
        positive=positive,
        tpr=float(tpr),
        id_accuracy=accuracy,
        id_scores=id_scores,
        ood_scores=ood_scores,
    )
