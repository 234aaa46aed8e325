"""The pytorch-ood detectors (deltakern.integrations.pytorch_ood): pytorch-ood's contract (sign,
encoder, info, hyperparameters), and pytorch-ood's own OODMetrics and GridSearch on their outputs
against dk.metrics with the conventions mapped.

Mapping (pytorch-ood: OOD positive, larger outlier score = more OOD; the outlier score is the
negated deltakern score, so an OOD row is "detected" when its deltakern score is low):

| pytorch-ood | dk.metrics |
|---|---|
| AUROC | auroc (the same pair probability, ties counting half) |
| FPR95TPR | fpr_at_tpr(positive="ood", rule="first") = ood_metrics()["fpr95_ood_positive"] |
| AUPR-IN | aupr(positive="id", method="trapezoid") |
| AUPR-OUT | aupr(positive="ood", method="trapezoid") |

dk's ``fpr95`` (ID positive, CLIP/MCM papers) is pytorch-ood's FPR@TPR with the roles swapped,
and dk's ``aupr_in`` / ``aupr_out`` are average precision, which pytorch-ood does not report.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pytorch_ood")

from pytorch_ood.api import DetectorInfo, FeaturesDetector, ModelNotSetException, Task  # noqa: E402
from pytorch_ood.metrics import OODMetrics  # noqa: E402
from pytorch_ood.metrics import functional as F  # noqa: E402
from pytorch_ood.utils import GridSearch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import deltakern as dk  # noqa: E402
from deltakern.core.errors import InvalidArgument, InvalidArgumentType  # noqa: E402
from deltakern.integrations.pytorch_ood import DeltaEnergy, Energy  # noqa: E402
from deltakern.ood.synthetic import make_synthetic  # noqa: E402

# pytorch-ood sums float64 trapezoids in its own order; dk's AUROC is exact rational arithmetic.
AREA_TOL = 1e-12


@pytest.fixture(scope="module")
def data():
    s = make_synthetic(n=3000, k=40, d=64, seed=3, ood_fraction=0.4)
    X = s.X.clone()
    ood = s.is_ood.clone()
    # Exact ties between ID and OOD scores: some OOD rows are copies of ID rows.
    id_rows, ood_rows = torch.nonzero(~ood).squeeze(1), torch.nonzero(ood).squeeze(1)
    X[ood_rows[:150]] = X[id_rows[:150]]
    labels = torch.where(ood, torch.full_like(s.labels, -1), s.labels)
    return X, s.W, ood, labels


def _pytorch_ood_metrics(outlier: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    m = OODMetrics()
    m.update(outlier, labels)
    return m.compute()


def _check_metrics_match(score: torch.Tensor, outlier: torch.Tensor, ood: torch.Tensor, labels: torch.Tensor):
    id_s, ood_s = score[~ood], score[ood]
    got = _pytorch_ood_metrics(outlier, labels)
    ours = dk.metrics.ood_metrics(id_s, ood_s)
    assert got["AUROC"] == pytest.approx(ours["auroc"], abs=AREA_TOL)
    # Counts divided in float64 on both sides: exactly equal.
    assert got["FPR95TPR"] == ours["fpr95_ood_positive"]
    assert got["FPR95TPR"] == dk.metrics.fpr_at_tpr(id_s, ood_s, 0.95, positive="ood", rule="first")
    assert got["AUPR-IN"] == pytest.approx(dk.metrics.aupr(id_s, ood_s, positive="id", method="trapezoid"), abs=AREA_TOL)
    assert got["AUPR-OUT"] == pytest.approx(dk.metrics.aupr(id_s, ood_s, positive="ood", method="trapezoid"), abs=AREA_TOL)
    # dk's fpr95 (ID positive) is pytorch-ood's FPR@TPR with ID as the "positive" (label < 0)
    # class and the deltakern score (higher = ID) as the detection score.
    swapped = torch.where(ood, torch.zeros_like(labels), -torch.ones_like(labels))
    assert float(F.fpr_at_tpr(score, swapped, 0.95)) == ours["fpr95"]
    return got, ours


@pytest.mark.parametrize("c, mode", [(1, "separate"), (3, "separate"), (3, "joint")])
def test_delta_energy_outputs_and_metrics_match_dk(data, c, mode):
    X, W, ood, labels = data
    X_before, W_before = X.clone(), W.clone()
    det = DeltaEnergy(None, W, c=c, mode=mode, reset=0.05, temperature=0.02)
    outlier = det.predict_features(X)
    ref = dk.score(X, W, c=c, mode=mode, reset=0.05, temperature=0.02)
    assert torch.equal(outlier, -ref.delta_energy)
    assert torch.equal(X, X_before) and torch.equal(W, W_before)
    # pytorch-ood's sign: larger = more OOD
    assert outlier[ood].mean() > outlier[~ood].mean()
    got, ours = _check_metrics_match(ref.delta_energy, outlier, ood, labels)
    assert 0.5 < got["AUROC"] < 1.0  # a real detector on this data, not a degenerate case


def test_ties_are_grouped_the_same_way(data):
    """Coarse scores with many ID/OOD ties: both libraries group equal scores exactly."""
    X, W, ood, labels = data
    score = torch.round(dk.score(X, W).delta_energy * 2) / 2
    assert torch.unique(score).numel() < score.numel() // 10
    _check_metrics_match(score, -score, ood, labels)


def test_energy_detector_and_predict_all_share_one_pass(data):
    X, W, ood, labels = data
    det = DeltaEnergy(None, W, c=2, temperature=0.01)
    all_scores = det.predict_all(X)
    ref = dk.score(X, W, c=2, temperature=0.01)
    for name in ("delta_energy", "energy", "max_logit", "msp"):
        assert torch.equal(all_scores[name], -getattr(ref, name)), name
    energy = Energy(None, W, temperature=0.01).predict_features(X)
    assert torch.equal(energy, -dk.energy(X, W, temperature=0.01))
    # Energy does not depend on c; the c = 2 state sums the same logits in another order.
    torch.testing.assert_close(energy, all_scores["energy"], rtol=1e-6, atol=0)
    _check_metrics_match(ref.energy, energy, ood, labels)


def test_contract_encoder_info_and_hyperparameters(data):
    X, W, _, _ = data
    encoder = torch.nn.Linear(16, W.shape[1])
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    for det in (DeltaEnergy(encoder, W, c=2), Energy(encoder, W)):
        assert isinstance(det, FeaturesDetector)
        assert not det.requires_fit
        assert isinstance(det.info, DetectorInfo) and Task.CLASSIFICATION in det.info.tasks
        with torch.no_grad():
            z = encoder(x)
        assert torch.equal(det.predict(x), det.predict_features(z))
        assert torch.equal(det(x), det.predict(x))  # __call__ forwards to predict
        assert det.fit(None) is det
        assert set(det.get_hyperparameters()) == set(det.hyperparameter_space)
    with pytest.raises(ModelNotSetException):
        DeltaEnergy(None, W).predict(x)


def test_settings_are_checked_and_a_bad_value_changes_nothing(data):
    _, W, _, _ = data
    k = W.shape[0]
    with pytest.raises(InvalidArgument, match="c must satisfy"):
        DeltaEnergy(None, W, c=k + 1)
    with pytest.raises(InvalidArgumentType):
        DeltaEnergy(None, W, c=2.0)
    with pytest.raises(InvalidArgument, match="mode"):
        DeltaEnergy(None, W, mode="both")
    with pytest.raises(InvalidArgument, match="temperature"):
        Energy(None, W, temperature=0.0)
    with pytest.raises(InvalidArgumentType, match="text_embeddings"):
        DeltaEnergy(None, W.numpy())
    det = DeltaEnergy(None, W, c=2)
    with pytest.raises(InvalidArgument):
        det.set_hyperparameters(c=0)
    assert det.c == 2
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        det.set_hyperparameters(alpha=1.0)
    assert det.set_hyperparameters(c=3).c == 3


def test_grid_search_over_c_picks_dk_best_auroc(data):
    X, W, ood, labels = data
    space = {"c": [1, 2, 4, 8]}
    det = DeltaEnergy(torch.nn.Identity(), W)  # an encoder makes GridSearch cache the features once
    loader = DataLoader(TensorDataset(X, labels), batch_size=512)
    search = GridSearch(det, None, loader, hyperparameter_space=space)
    best = search.run()
    expected = {c: dk.metrics.auroc(*(lambda s: (s[~ood], s[ood]))(dk.delta_energy(X, W, c=c))) for c in space["c"]}
    for record in search.results_:
        assert record["score"] == pytest.approx(expected[record["params"]["c"]], abs=AREA_TOL)
    assert best == {"c": max(expected, key=expected.get)}
    assert det.c == best["c"]  # GridSearch leaves the detector at the best setting


def test_importing_deltakern_does_not_import_pytorch_ood():
    code = (
        "import sys, deltakern, deltakern.integrations\n"
        "from deltakern.cli.main import build_parser\n"
        "build_parser()\n"
        "assert 'pytorch_ood' not in sys.modules, 'pytorch_ood imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_readme_example_runs(capsys):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Thresholds, filtering and pytorch-ood", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1 and "GridSearch" in blocks[0]
    exec(compile(blocks[0], "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "FPR95TPR" in printed and "{'c': " in printed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_detectors_follow_the_text_embeddings_to_cuda(data):
    """pytorch-ood's ``to(device)`` moves the text embeddings; CPU features are moved to them,
    scored by the CUDA backend, and pytorch-ood's metrics on the GPU scores equal dk.metrics."""
    X, W, ood, labels = data
    det = DeltaEnergy(None, W, c=3).to("cuda")
    assert det.text_embeddings.is_cuda and det.device.type == "cuda"
    outlier = det.predict_features(X)  # a CPU tensor in, moved by the detector
    assert outlier.is_cuda
    ref = dk.score(X.cuda(), W.cuda(), c=3)
    assert torch.equal(outlier, -ref.delta_energy)
    _check_metrics_match(ref.delta_energy, outlier, ood.cuda(), labels.cuda())
