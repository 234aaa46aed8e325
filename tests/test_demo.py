"""`deltakern demo` and the synthetic data it scores."""

from __future__ import annotations

import subprocess
import sys

import torch

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


def test_demo_command_runs_and_reports_throughput():
    out = subprocess.run(
        [sys.executable, "-m", "deltakern.cli", "demo", "--n", "3000", "--k", "50", "--d", "32", "--c", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "rows/s" in out.stdout and "N=3,000" in out.stdout
    assert "accuracy" in out.stdout.lower()
