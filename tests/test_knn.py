"""The kNN baseline score against a float64 brute-force evaluation."""

from __future__ import annotations

import pytest
import torch

from deltakern.ood.knn import knn_score


def brute_force(X, bank, k):
    x = X.double() / X.double().norm(dim=1, keepdim=True)
    b = bank.double() / bank.double().norm(dim=1, keepdim=True)
    dist = torch.cdist(x, b)
    return -dist.sort(dim=1).values[:, k - 1]


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("n,m,d,k", [(1, 1, 3, 1), (7, 50, 16, 5), (130, 257, 65, 50)])
def test_matches_brute_force(backend, n, m, d, k):
    pytest.importorskip("faiss") if backend == "faiss" else None
    g = torch.Generator().manual_seed(n + m + d)
    X, bank = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g) * 3
    got = knn_score(X, bank, k=k, backend=backend, batch_rows=64)
    want = brute_force(X, bank, k)
    assert got.shape == (n,) and got.dtype == torch.float32
    # Distances come from 2 - 2·cos in float32: squared distances agree to ~1e-6 ...
    torch.testing.assert_close(got.double() ** 2, want**2, rtol=0, atol=1e-5)
    # ... and the values themselves, sign included (higher = closer = more ID): the square
    # root amplifies the error only near distance 0, hence the wider bound.
    assert bool((got <= 0).all()), "kNN scores are negative distances"
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-3)


def test_id_rows_score_higher_than_far_rows():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 32, generator=g)
    bank = centers.repeat_interleave(40, 0) + 0.1 * torch.randn(200, 32, generator=g)
    near = centers + 0.1 * torch.randn(5, 32, generator=g)
    far = torch.randn(5, 32, generator=g)
    scores = knn_score(torch.cat([near, far]), bank, k=10)
    assert float(scores[:5].min()) > float(scores[5:].max())


def test_float64_torch_backend_stays_float64_and_inputs_untouched():
    X, bank = torch.randn(9, 8, dtype=torch.float64), torch.randn(20, 8, dtype=torch.float64)
    before = (X.clone(), bank.clone())
    got = knn_score(X, bank, k=3, backend="torch")
    assert got.dtype == torch.float64 and bool((got <= 0).all())
    torch.testing.assert_close(got, brute_force(X, bank, 3), rtol=1e-12, atol=1e-12)
    assert torch.equal(X, before[0]) and torch.equal(bank, before[1])


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        ({"k": 0}, ValueError, ["k", "1 <= k <= 20"]),
        ({"k": 21}, ValueError, ["k", "21"]),
        ({"backend": "annoy"}, ValueError, ["backend", "'annoy'"]),
        ({"bank": torch.randn(20, 7)}, ValueError, ["X.shape[1]=8", "bank.shape[1]=7"]),
        ({"X": torch.zeros(2, 8)}, ValueError, ["X", "zero-norm"]),
    ],
)
def test_bad_input(kwargs, exc, words):
    args = {"X": torch.randn(4, 8), "bank": torch.randn(20, 8), "k": 3, **kwargs}
    with pytest.raises(exc) as info:
        knn_score(args.pop("X"), args.pop("bank"), **args)
    for word in words:
        assert word in str(info.value)


def test_eval_reports_the_knn_baseline(tmp_path):
    import json
    import subprocess
    import sys

    import numpy as np

    from deltakern import metrics
    from deltakern.ood.synthetic import make_synthetic

    data = make_synthetic(n=1200, k=20, d=128, seed=1)
    bank = make_synthetic(n=800, k=20, d=128, seed=1, ood_fraction=0.0).X
    files = {"id": data.X[~data.is_ood], "ood": data.X[data.is_ood], "W": data.W, "bank": bank}
    for name, t in files.items():
        np.save(tmp_path / f"{name}.npy", t.numpy())
    out = subprocess.run(
        [sys.executable, "-m", "deltakern.cli", "eval", "--id", str(tmp_path / "id.npy"),
         "--ood", f"far={tmp_path / 'ood.npy'}", "--classes", str(tmp_path / "W.npy"),
         "--knn-bank", str(tmp_path / "bank.npy"), "--knn-k", "7", "--c", "1", "--no-plots",
         "--quiet", "--out", str(tmp_path / "report")],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "KNN (k-th NN)" in out.stdout
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    row = next(r for r in report["results"] if r["score"] == "knn")
    want = metrics.ood_metrics(knn_score(files["id"], bank, k=7), knn_score(files["ood"], bank, k=7))
    assert row["auroc"] == pytest.approx(want["auroc"], abs=1e-12)
    assert row["fpr95"] == pytest.approx(want["fpr95"], abs=1e-12)
    assert report["inputs"]["knn_bank"]["shape"] == [800, 128]
