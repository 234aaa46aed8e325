"""Thresholds (deltakern.ood.threshold) and `deltakern calibrate`: the fitting rule and its ties,
agreement with dk.metrics' operating point, refusal of scores made otherwise, JSON round trip."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import deltakern as dk
from deltakern import cli
from deltakern.core.errors import InputNotFound, InvalidArgument, InvalidArgumentType
from deltakern.ood.threshold import ScoreIdentity, Threshold, fit_threshold, load_threshold

sys.path.insert(0, str(Path(__file__).parent))
from _scored import write_scored  # noqa: E402

IDENT = ScoreIdentity(score="delta_energy", c=2, temperature=0.02, reset=0.1, mode="joint", model="ViT-B-32", pretrained="openai")


def brute_force(scores: np.ndarray, target: float) -> float:
    """The largest t with |{s >= t}| / n >= target, by trying every score."""
    n = len(scores)
    return max(t for t in scores.tolist() if np.count_nonzero(scores >= t) / n >= target)


@pytest.mark.parametrize("n, target", [(1, 0.95), (20, 0.95), (100, 0.95), (1000, 0.9), (333, 0.5), (57, 1.0), (1000, 0.001)])
def test_fitting_rule_with_ties_matches_brute_force_and_dk_metrics(n, target):
    rng = np.random.default_rng(n)
    id_s = np.round(rng.normal(size=n), 1).astype(np.float32)  # many ties
    ood_s = np.round(rng.normal(-1.0, size=2 * n + 1), 1).astype(np.float32)
    before = id_s.copy()
    t = fit_threshold(id_s, IDENT, target=target, ood_scores=ood_s)
    assert np.array_equal(id_s, before)
    assert t.value == brute_force(id_s, target)
    assert t.id_acceptance == np.count_nonzero(id_s >= t.value) / n >= target
    m = dk.metrics.ood_metrics(id_s, ood_s, tpr=target)
    assert t.value == m["threshold"]
    assert t.fpr == m["fpr95"] and t.n_ood == len(ood_s) and t.n_id == n


def test_exact_counts_and_ties_by_hand():
    scores = np.arange(1, 101, dtype=np.float64)
    t = fit_threshold(scores, IDENT, target=0.95)
    assert t.value == 6.0 and t.id_acceptance == 0.95  # keeps exactly 95 of 100
    # 0.55 * 100 is 55.00000000000001 in float64, but 55 / 100 >= 0.55: keep 55, not 56.
    t = fit_threshold(scores, IDENT, target=0.55)
    assert t.value == 46.0 and t.id_acceptance == 0.55
    tied = np.array([5.0] * 10 + [1.0] * 10)
    t = fit_threshold(tied, IDENT, target=0.3)
    assert t.value == 5.0 and t.id_acceptance == 0.5  # the 10 tied scores are all kept
    t = fit_threshold(torch.tensor([3.0, -np.inf, 2.0]), IDENT, target=1.0)
    assert t.value == -np.inf and t.id_acceptance == 1.0


def test_accept_refuses_scores_made_otherwise():
    t = fit_threshold(np.array([1.0, 2.0, 3.0, 4.0]), IDENT, target=0.5)
    assert t.accept(np.array([2.9, 3.0, np.nan, 10.0], dtype=np.float32), IDENT).tolist() == [False, True, False, True]
    for change in ({"c": 3}, {"temperature": 0.01}, {"reset": 0.0}, {"mode": "separate"}, {"model": "RN50"},
                   {"pretrained": None}, {"classnames_sha256": "x"}, {"score": "energy"}):  # fmt: skip
        with pytest.raises(InvalidArgument, match="other settings") as info:
            t.accept(np.zeros(3), replace(IDENT, **change))
        assert info.value.param == "threshold"
    # energy does not depend on c, reset or mode: a threshold on energy ignores them, not τ.
    energy = fit_threshold(np.array([1.0, 2.0]), replace(IDENT, score="energy"), target=1.0)
    energy.check(replace(IDENT, score="energy", c=5, reset=0.0, mode="separate"))
    with pytest.raises(InvalidArgument, match="temperature"):
        energy.check(replace(IDENT, score="energy", temperature=1.0))


def test_bad_inputs():
    with pytest.raises(InvalidArgument, match="target"):
        fit_threshold([1.0], IDENT, target=0.0)
    with pytest.raises(InvalidArgument, match="NaN"):
        fit_threshold([1.0, float("nan")], IDENT)
    with pytest.raises(InvalidArgument, match="at least one"):
        fit_threshold([], IDENT)
    with pytest.raises(InvalidArgumentType):
        fit_threshold(["a"], IDENT)
    with pytest.raises(InvalidArgumentType):
        fit_threshold([1.0], {"score": "delta_energy"})
    with pytest.raises(InvalidArgument, match="score"):
        ScoreIdentity(score="logits")


def test_json_round_trip_and_load_errors(tmp_path):
    t = fit_threshold(np.array([0.5, 1.5, 2.5], dtype=np.float32), IDENT, target=0.6, ood_scores=[0.1, 2.0])
    path = tmp_path / "sub" / "T.json"
    t.save(path)
    assert load_threshold(path) == t
    assert [p.name for p in path.parent.iterdir()] == ["T.json"]  # no temporary file left
    with pytest.raises(InputNotFound):
        load_threshold(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    for text in ("{", json.dumps({"kind": "other"}), json.dumps({**t.to_dict(), "version": 9}),
                 json.dumps({k: v for k, v in t.to_dict().items() if k != "value"})):  # fmt: skip
        bad.write_text(text)
        with pytest.raises(InvalidArgument):
            load_threshold(bad)
    assert Threshold.from_dict(json.loads(path.read_text())).identity == IDENT


def test_calibrate_cli(tmp_path, capsys):
    pytest.importorskip("pyarrow")  # the clip extra: scored parquet inputs
    id_a = write_scored(tmp_path / "id_a.parquet", 700, seed=1, c=2)
    id_b = write_scored(tmp_path / "id_b.parquet", 300, seed=2, c=2)
    ood = write_scored(tmp_path / "ood.parquet", 400, seed=3, c=2, shift=-1.5)
    out = tmp_path / "T.json"
    # ID from a file and a folder of parts together; OOD from a file.
    argv = ["calibrate", str(id_a), str(id_b.with_suffix(".parts")), "--ood", str(ood), "--target-tpr", "0.9", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    import pyarrow.parquet as pq

    id_s = np.concatenate([pq.read_table(p).column("delta_energy").to_numpy() for p in (id_a, id_b)])
    ood_s = pq.read_table(ood).column("delta_energy").to_numpy()
    t = load_threshold(out)
    m = dk.metrics.ood_metrics(id_s, ood_s, tpr=0.9)
    assert t.value == m["threshold"] == brute_force(id_s, 0.9)
    assert t.fpr == m["fpr95"] and t.n_id == 1000 and t.n_ood == 400
    assert t.identity.c == 2 and t.identity.model == "ViT-B-32" and t.identity.classnames_sha256
    assert f"{m['fpr95']:.2%}" in printed and "of 1000 ID rows" in printed

    # ID files scored with other settings are refused, naming the difference.
    other = write_scored(tmp_path / "other.parquet", 50, c=3)
    assert cli.main(["calibrate", str(id_a), str(other), "--out", str(tmp_path / "T2.json")]) == 2
    err = capsys.readouterr().err
    assert "c 2 != 3" in err and not (tmp_path / "T2.json").exists()
    assert cli.main(["calibrate", str(id_a), "--ood", str(other), "--out", str(tmp_path / "T2.json")]) == 2
    assert "argument --ood" in capsys.readouterr().err
    assert cli.main(["calibrate", str(id_a), "--target-tpr", "1.5", "--out", str(tmp_path / "T2.json")]) == 2
    assert "argument --target-tpr" in capsys.readouterr().err
    assert cli.main(["calibrate", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "T2.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
