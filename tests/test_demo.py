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


def run_demo(*argv):
    out = subprocess.run([sys.executable, "-m", "deltakern.cli", "demo", *argv], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out


def table_rows(stdout):
    """{(label, c or None): (AUROC, FPR, AUPR-In, AUPR-Out)} as printed."""
    rows = {}
    for line in stdout.splitlines():
        match = ROW.match(line.strip())
        if match:
            numbers = tuple(float(v) for v in line.split()[-4:])
            rows[(match["label"].strip(), int(match["c"]) if match["c"] else None)] = numbers
    return rows


def test_demo_says_what_its_times_tables_and_data_are():
    out = run_demo("--n", "3000", "--k", "20", "--d", "64", "--seed", "1", "--c", "2")
    lines = out.stdout.splitlines()
    # The progress bar and the printed times: the bar's own elapsed time (tqdm floors it to whole
    # seconds) is the loop time printed, and the fused pass is a part of it.
    fused = float(re.search(r"fused ΔEnergy pass \(both modes, c=2\): ([\d.]+) s for 3,000 rows", out.stdout)[1])
    loop = float(re.search(r"progress bar: ([\d.]+) s, which also covers generating the rows, the MCM pass", out.stdout)[1])
    bar = re.findall(r"3\.00k/3\.00k \[(\d+):(\d+)<", out.stderr)
    assert bar, out.stderr
    bar_seconds = 60 * int(bar[-1][0]) + int(bar[-1][1])
    # Both are printed to 0.01 s, so on a fast machine they may print equal: a part is at most the whole.
    assert fused <= loop and bar_seconds <= loop < bar_seconds + 1.5, (fused, loop, bar_seconds)
    # A legend right under the main table (after its accuracy line) names the OOD set and the FPR.
    legend = lines.index(next(line for line in lines if line.startswith("synthetic-ood = the generated OOD rows")))
    assert lines[legend - 1].startswith("ID top-1 accuracy:")
    assert "FPR95↓ (ID+) = % of OOD rows still accepted at the threshold that keeps 95% of ID rows" in lines[legend]
    assert "not the paper's benchmark" in out.stdout
    # With reset 0 the c = 1 rows rank like MSP computed in float64, as the note says (float32 MSP
    # ties 58 confident rows at 1.0 here, which moves its own AUPR-In by 0.28 points).
    assert "note: with reset 0, ΔEnergy at c = 1 = −log(1 − MSP)" in out.stdout
    assert "float32 MSP rounds confident rows to 1 and ties them" in out.stdout
    rows = table_rows(out.stdout)
    want, *_ = demo_expectations(3000, 20, 64, 1, 0.01, 2, 0.0)
    msp_auroc, msp_aupr_in = want[("MSP", None)]
    for mode in ("ΔEnergy (separate)", "ΔEnergy (joint)"):
        auroc, fpr, aupr_in, _ = rows[(mode, 1)]
        assert abs(auroc - msp_auroc) <= 0.01 and abs(aupr_in - msp_aupr_in) <= 0.01, (mode, rows[(mode, 1)])
        assert fpr == rows[("MSP", None)][1]
    # With another reset the note says the opposite.
    out = run_demo("--n", "2000", "--k", "20", "--d", "64", "--c", "1", "--reset", "0.3")
    assert "note: with reset 0.3 (≠ 0), ΔEnergy at c = 1 does not rank like MSP" in out.stdout
    assert table_rows(out.stdout)[("ΔEnergy (separate)", None)] != table_rows(out.stdout)[("MSP", None)]


def test_delta_energy_at_c1_reset0_is_msp_up_to_a_tiny_term():
    """The demo's note, checked: ΔE_1 = −log(1 − MSP) − log(1 + e^−LSE(others)) with the last term
    below e^−ℓ₂; at τ = 0.01 on CLIP-like data the float64 orders are identical and dk.score's
    float32 AUROCs agree, while at τ = 1 (small logits) the orders differ."""
    s = synthetic.make_synthetic(n=4000, k=1000, d=512, seed=0)
    ref = scores64(s.X, s.W, temperature=0.01, c=2)
    ell, top = ref["logits"], ref["topk_indices"][:, 0]
    others = torch.logsumexp(ell.scatter(1, top[:, None], float("-inf")), dim=1)
    correction = torch.log1p(torch.exp(-others))
    # −log(1 − MSP) = E − LSE(others), computed without the cancellation of 1 − MSP
    de1 = ref["delta_energy_terms"][:, 0]
    torch.testing.assert_close(de1, ref["energy"] - others - correction, rtol=1e-12, atol=1e-12)
    assert bool((correction <= torch.exp(-ref["topk_values"][:, 1])).all())
    assert float(correction.max()) < 1e-8
    assert torch.equal(torch.argsort(de1, stable=True), torch.argsort(ref["msp"], stable=True))
    r = dk.score(s.X, s.W, temperature=0.01, c=1, reset=0.0)
    id_rows, ood_rows = ~s.is_ood, s.is_ood
    a_de = dk.metrics.auroc(r.delta_energy[id_rows], r.delta_energy[ood_rows])
    a_msp = dk.metrics.auroc(r.msp[id_rows], r.msp[ood_rows])
    assert abs(float(a_de) - float(a_msp)) < 1e-6
    # Not exactly at a large τ: the correction term depends on more than MSP.
    big = scores64(s.X, s.W, temperature=1.0, c=1)
    assert not torch.equal(torch.argsort(big["delta_energy"], stable=True), torch.argsort(big["msp"], stable=True))
