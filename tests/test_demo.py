"""`deltakern demo` and the synthetic data it scores."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from oracle import scores64

import deltakern as dk
from deltakern.ood import synthetic


def test_synthetic_is_reproducible_and_stream_independent():
    a = synthetic.make_synthetic(n=70_000, k=20, d=16, seed=3, ood_fraction=0.25)
    b = synthetic.make_synthetic(n=70_000, k=20, d=16, seed=3, ood_fraction=0.25)
    assert torch.equal(a.X, b.X) and torch.equal(a.W, b.W) and torch.equal(a.labels, b.labels)
    assert int(a.is_ood.sum()) == round(70_000 * 0.25)
    assert bool((a.labels[a.is_ood] == -1).all()) and bool((a.labels[~a.is_ood] >= 0).all())
    other = synthetic.make_synthetic(n=70_000, k=20, d=16, seed=4, ood_fraction=0.25)
    assert not torch.equal(a.X, other.X)


def test_synthetic_looks_like_clip():
    s = synthetic.make_synthetic(n=4000, k=100, d=512, seed=0)
    r = dk.score(s.X, s.W)
    cos = r.max_logit * 0.01
    # CLIP-like cosine range and a modality gap (unrelated pairs still near 0.18)
    assert 0.15 < float(cos.min()) and float(cos.max()) < 0.5
    xn = s.X / s.X.norm(dim=1, keepdim=True)
    assert abs(float((xn @ s.W.T).mean()) - 0.18) < 0.03
    # ID rows are mostly classified right and score higher than OOD rows on average
    acc = (r.pred[~s.is_ood] == s.labels[~s.is_ood]).float().mean()
    assert float(acc) > 0.6
    assert float(r.delta_energy[~s.is_ood].mean()) > 2 * float(r.delta_energy[s.is_ood].mean())


ROW = re.compile(r"^(?P<label>\S.*?)\s{2,}(?:synthetic-ood|(?P<c>\d+))\s+(?P<auroc>[\d.]+)\s+(?P<fpr>[\d.]+)\s+(?P<aupr_in>[\d.]+)\s+(?P<aupr_out>[\d.]+)$")


def demo_expectations(n, k, d, seed, temperature, c, reset):
    """The demo's table from the float64 oracle and scikit-learn (no deltakern scoring or
    metrics code): {(label, c or None): (AUROC %, AUPR-In %)}, accuracy %, ID and OOD counts."""
    skm = pytest.importorskip("sklearn.metrics")
    from deltakern.ood.evaluation import SCORE_LABELS

    blocks = list(synthetic.iter_blocks(n, k, d, seed, 0.5))
    X = torch.cat([b[0] for b in blocks])
    is_ood = torch.cat([b[1] for b in blocks]).numpy()
    labels = torch.cat([b[2] for b in blocks])
    W = synthetic.class_embeddings(k, d, seed)
    sep = scores64(X, W, temperature=temperature, c=c, reset=reset, mode="separate")
    joint = scores64(X, W, temperature=temperature, c=c, reset=reset, mode="joint")
    cols = {"delta_energy": sep["delta_energy"], "delta_energy_joint": joint["delta_energy"],
            "energy": sep["energy"], "msp": sep["msp"], "max_logit": sep["max_logit"],
            "mcm": scores64(X, W, temperature=1.0)["msp"]}
    y = (~is_ood).astype(np.int64)  # ID positive

    def metrics(s):
        s = s.numpy()
        return 100 * skm.roc_auc_score(y, s), 100 * skm.average_precision_score(y, s)

    want = {(SCORE_LABELS[name], None): metrics(s) for name, s in cols.items()}
    for j in range(1, c + 1):
        want[(SCORE_LABELS["delta_energy"], j)] = metrics(sep["delta_energy_terms"][:, :j].sum(1))
        want[(SCORE_LABELS["delta_energy_joint"], j)] = metrics(joint["delta_energy_terms"][:, j - 1])
    id_rows = torch.from_numpy(~is_ood)
    accuracy = 100 * float((sep["pred"][id_rows] == labels[id_rows]).double().mean())
    return want, accuracy, int((~is_ood).sum()), int(is_ood.sum())


def test_demo_command_reports_the_numbers_of_an_independent_computation():
    # reset 0.3 moves the ΔEnergy AUROCs by 0.3-0.7 points from reset 0: an ignored --reset shows
    n, k, d, seed, temperature, c, reset = 3000, 20, 64, 5, 0.02, 2, 0.3
    out = subprocess.run(
        [sys.executable, "-m", "deltakern.cli", "demo", "--n", str(n), "--k", str(k), "--d", str(d), "--seed", str(seed),
         "--temperature", str(temperature), "--c", str(c), "--reset", str(reset)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "rows/s" in out.stdout and "N=3,000" in out.stdout
    want, accuracy, n_id, n_ood = demo_expectations(n, k, d, seed, temperature, c, reset)
    assert f"ID rows: {n_id:,}  OOD rows: {n_ood:,}" in out.stdout
    got = {}
    for line in out.stdout.splitlines():
        match = ROW.match(line.strip())
        if match:
            key = (match["label"].strip(), int(match["c"]) if match["c"] else None)
            got[key] = (float(match["auroc"]), float(match["aupr_in"]))
    assert set(got) == set(want), (sorted(got), sorted(want))
    for key, (auroc, aupr_in) in want.items():
        # Printed with two decimals; float32 scores may order a few near-equal pairs
        # differently from float64, which moves a percentage by far less than 0.05.
        assert abs(got[key][0] - auroc) <= 0.05, (key, got[key], auroc)
        assert abs(got[key][1] - aupr_in) <= 0.05, (key, got[key], aupr_in)
    printed = float(re.search(r"ID top-1 accuracy: ([\d.]+)%", out.stdout)[1])
    assert abs(printed - accuracy) <= 0.1  # a near-tie may flip one row's prediction (0.067%)
