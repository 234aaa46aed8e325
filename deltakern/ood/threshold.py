"""A decision threshold fitted on in-distribution scores, bound to the settings that made them.

A score is only comparable with a threshold fitted on scores made the same way: the same score
(``delta_energy``, ``energy``, ...), temperature, ``c``, ``reset`` and mode, and the same model
and class embeddings. :class:`Threshold` carries those settings (a :class:`ScoreIdentity`) and
refuses scores made with others.

**Fitting rule (ties included).** With ``n`` ID scores and a target ID acceptance rate ``target``
(default 0.95), ``m`` is the smallest count with ``m / n >= target`` (compared in float64, as
``dk.metrics.fpr_at_tpr`` does), and the threshold is the ``m``-th largest ID score. A score is
**accepted (called in-distribution) when ``score >= threshold``**, so every ID score equal to the
threshold is accepted: the achieved acceptance (``id_acceptance``) is at least ``target`` and
exceeds the smallest possible ``m / n`` only when ID scores tie at the cut. NaN scores are never
accepted. This is the threshold behind ``dk.metrics.ood_metrics(...)["threshold"]``
(docs/conventions.md §5.4, ``positive="id"``, ``rule="first"``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deltakern.core.constants import MODES
from deltakern.core.errors import InputNotFound, InvalidArgument, InvalidArgumentType
from deltakern.core.validation import check_choice, check_finite_number, check_int_range, check_positive
from deltakern.data.atomic import write_json

__all__ = ["SCORE_NAMES", "ScoreIdentity", "Threshold", "check_target", "fit_threshold", "load_threshold"]

# The score columns of `deltakern score` a threshold can be fitted on (all higher = ID).
SCORE_NAMES = ("delta_energy", "energy", "msp", "max_logit")
KIND, VERSION = "deltakern-threshold", 1
# Settings every score depends on; ΔEnergy also depends on c, reset and mode (energy, MSP and
# max-logit do not: they are the same numbers whatever c, reset and mode were).
_COMMON = ("score", "temperature", "model", "pretrained", "classnames_sha256", "templates_sha256", "prompts")
_DELTA_ONLY = ("c", "reset", "mode")


@dataclass(frozen=True)
class ScoreIdentity:
    """What made a column of scores: the score's name and the settings it depends on.

    ``model``, ``pretrained`` (the weights' identity), ``classnames_sha256``,
    ``templates_sha256`` and ``prompts`` (a prompt checkpoint's identity) identify the image
    and class embeddings; they are ``None`` for scores computed in Python from embeddings whose
    origin is not recorded. Build it from a score run's manifest with :meth:`from_manifest`.
    """

    score: str = "delta_energy"
    c: int = 1
    temperature: float = 0.01
    reset: float = 0.0
    mode: str = "separate"
    model: str | None = None
    pretrained: str | None = None
    classnames_sha256: str | None = None
    templates_sha256: str | None = None
    prompts: str | None = None

    def __post_init__(self) -> None:
        check_choice("score", self.score, SCORE_NAMES)
        check_int_range("c", self.c, 1, 2**31)
        object.__setattr__(self, "temperature", check_positive("temperature", self.temperature))
        object.__setattr__(self, "reset", check_finite_number("reset", self.reset))
        check_choice("mode", self.mode, MODES)
        for name in ("model", "pretrained", "classnames_sha256", "templates_sha256", "prompts"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise InvalidArgumentType(f"{name} must be a string or None, got {type(value).__name__}", param=name)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], score: str = "delta_energy") -> ScoreIdentity:
        """The identity of column ``score`` of a ``deltakern score`` output, from its manifest
        (``x.manifest.json``: ``args`` holds c, temperature, reset, mode, model, pretrained and
        the class fingerprints)."""
        if not isinstance(manifest, dict) or manifest.get("kind") != "deltakern-scores" or not isinstance(manifest.get("args"), dict):
            raise InvalidArgument("manifest is not the manifest of a `deltakern score` run (kind 'deltakern-scores')", param="manifest")
        args = manifest["args"]
        missing = [k for k in ("c", "temperature", "reset", "mode", "model", "pretrained") if k not in args]
        if missing:
            raise InvalidArgument(f"manifest args lack {', '.join(missing)}", param="manifest")
        return cls(
            score=score,
            c=args["c"],
            temperature=args["temperature"],
            reset=args["reset"],
            mode=args["mode"],
            model=args["model"],
            pretrained=args["pretrained"],
            classnames_sha256=args.get("classnames_sha256"),
            templates_sha256=args.get("templates_sha256"),
            prompts=args.get("prompts"),
        )

    def relevant(self) -> tuple[str, ...]:
        """The fields two identities must share for their scores to be comparable."""
        return _COMMON + (_DELTA_ONLY if self.score == "delta_energy" else ())

    def differences(self, other: ScoreIdentity) -> list[str]:
        """``["name: mine != theirs", ...]`` over the fields that matter for this score."""
        return [
            f"{name} {getattr(self, name)!r} != {getattr(other, name)!r}"
            for name in self.relevant()
            if getattr(self, name) != getattr(other, name)
        ]


def _scores_array(name: str, scores: object) -> np.ndarray:
    """A 1-D float64 numpy view/copy of ``scores`` (tensor, array or sequence), never written."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    arr = np.asarray(scores)
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise InvalidArgumentType(f"{name} must hold real numbers, got dtype {arr.dtype}", param=name)
    if arr.ndim != 1:
        raise InvalidArgument(f"{name} must be 1-D, got shape {arr.shape}", param=name)
    return arr


@dataclass(frozen=True)
class Threshold:
    """A fitted decision rule: a score ``>= value`` is accepted (in-distribution).

    ``identity`` says which scores it applies to; ``target`` is the ID acceptance rate it was
    fitted for, ``id_acceptance`` the rate it achieves on the ``n_id`` fitting scores (``>=
    target``; more only when ID scores tie at the threshold). ``fpr`` and ``n_ood`` are the
    fraction of OOD scores accepted and their count when OOD scores were given, else ``None``.
    """

    value: float
    identity: ScoreIdentity
    target: float
    id_acceptance: float
    n_id: int
    fpr: float | None = None
    n_ood: int | None = None

    def check(self, identity: ScoreIdentity) -> None:
        """Raise :class:`InvalidArgument` when scores made as ``identity`` says cannot be
        compared with this threshold (another score, τ, c, reset, mode, model or class set)."""
        if not isinstance(identity, ScoreIdentity):
            raise InvalidArgumentType(f"identity must be a ScoreIdentity, got {type(identity).__name__}", param="identity")
        diff = self.identity.differences(identity)
        if diff:
            raise InvalidArgument(
                "threshold was fitted for scores made with other settings (threshold vs scores): " + "; ".join(diff),
                param="threshold",
            )

    def accept(self, scores: object, identity: ScoreIdentity) -> np.ndarray:
        """Boolean mask ``scores >= value`` (True = accepted as in-distribution) for ``scores``
        made as ``identity`` says; refuses other settings (see :meth:`check`). The comparison is
        exact: float32 scores are widened to float64, which holds every float32 value."""
        self.check(identity)
        arr = _scores_array("scores", scores)
        return arr >= self.value

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (see :func:`load_threshold`)."""
        return {
            "kind": KIND,
            "version": VERSION,
            "rule": "a score >= value is accepted (in-distribution)",
            "value": self.value,
            "target": self.target,
            "id_acceptance": self.id_acceptance,
            "n_id": self.n_id,
            "fpr": self.fpr,
            "n_ood": self.n_ood,
            "identity": asdict(self.identity),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Threshold:
        """Inverse of :meth:`to_dict`; raises :class:`InvalidArgument` on anything else."""
        if not isinstance(data, dict) or data.get("kind") != KIND:
            raise InvalidArgument(f"threshold data must be a {KIND!r} object", param="threshold")
        if data.get("version") != VERSION:
            raise InvalidArgument(f"threshold version {data.get('version')!r} is not supported (expected {VERSION})", param="threshold")
        try:
            ident = data["identity"]
            identity = ScoreIdentity(**{f.name: ident[f.name] for f in fields(ScoreIdentity)})
            value = float(data["value"])
            return cls(
                value=value,
                identity=identity,
                target=float(data["target"]),
                id_acceptance=float(data["id_acceptance"]),
                n_id=int(data["n_id"]),
                fpr=None if data.get("fpr") is None else float(data["fpr"]),
                n_ood=None if data.get("n_ood") is None else int(data["n_ood"]),
            )
        except (KeyError, TypeError) as exc:
            raise InvalidArgument(f"threshold data is incomplete or malformed: {exc!r}", param="threshold") from exc

    def save(self, path: str | os.PathLike) -> Path:
        """Write the threshold as JSON, atomically (temporary file + rename)."""
        return write_json(path, self.to_dict(), indent=2)


def load_threshold(path: str | os.PathLike) -> Threshold:
    """Read a threshold written by :meth:`Threshold.save` (or ``deltakern calibrate``)."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"threshold file {str(path)!r} does not exist", param="threshold")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"threshold file {str(path)!r} is not JSON: {exc}", param="threshold") from exc
    return Threshold.from_dict(data)


def check_target(target: object) -> float:
    """``target`` as a float in (0, 1]; raises naming ``target`` otherwise."""
    target = check_finite_number("target", target)
    if not 0.0 < target <= 1.0:
        raise InvalidArgument(f"target must lie in (0, 1], got {target}", param="target")
    return target


def fit_threshold(
    id_scores: object,
    identity: ScoreIdentity,
    *,
    target: float = 0.95,
    ood_scores: object | None = None,
) -> Threshold:
    """Fit the threshold accepting at least ``target`` of ``id_scores`` (see the module's
    fitting rule for ties). ``identity`` says how the scores were made. With ``ood_scores``
    (made the same way) the fraction of them the threshold accepts is recorded as ``fpr``.
    Inputs (torch tensors, numpy arrays, sequences) are never modified.
    """
    if not isinstance(identity, ScoreIdentity):
        raise InvalidArgumentType(f"identity must be a ScoreIdentity, got {type(identity).__name__}", param="identity")
    target = check_target(target)
    s = _scores_array("id_scores", id_scores)
    n = int(s.shape[0])
    if n == 0:
        raise InvalidArgument("id_scores must hold at least one score", param="id_scores")
    if s.dtype.kind == "f" and np.isnan(s).any():
        raise InvalidArgument(f"id_scores must not contain NaN, got {int(np.isnan(s).sum())}", param="id_scores")
    # m = the smallest count with m / n >= target in float64 (ceil(target * n) up to rounding).
    m = max(1, min(n, math.ceil(target * n)))
    while m > 1 and (m - 1) / n >= target:
        m -= 1
    while m / n < target:
        m += 1
    # The m-th largest score, in O(n): np.partition puts the (n - m)-th smallest in place.
    value = float(np.partition(s, n - m)[n - m])
    accepted = int(np.count_nonzero(s >= value))
    fpr = n_ood = None
    if ood_scores is not None:
        o = _scores_array("ood_scores", ood_scores)
        if o.shape[0] == 0:
            raise InvalidArgument("ood_scores must hold at least one score", param="ood_scores")
        n_ood = int(o.shape[0])
        fpr = int(np.count_nonzero(o >= value)) / n_ood
    return Threshold(value=value, identity=identity, target=target, id_acceptance=accepted / n, n_id=n, fpr=fpr, n_ood=n_ood)
