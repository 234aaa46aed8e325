"""`deltakern eval`, deltakern.evaluation, deltakern.report and deltakern.io on small files."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from oracle import scores64
from PIL import Image
from safetensors.torch import save_file

import deltakern as dk
from deltakern import cli
from deltakern.data import arrays as io
from deltakern.ood import evaluation
from deltakern.ood.synthetic import make_synthetic

C = 2
TAU = 0.02


@pytest.fixture(scope="module")
def data():
    s = make_synthetic(n=700, k=12, d=16, seed=3, ood_fraction=0.6)
    ood = s.X[s.is_ood]
    return {
        "W": s.W,
        "X_id": s.X[~s.is_ood],
        "labels": s.labels[~s.is_ood],
        "near": ood[:200],
        "far": ood[200:] * torch.linspace(0.5, 2.0, ood.shape[0] - 200)[:, None],
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("eval_inputs")
    paths = {
        "classes": root / "classes.pt",
        "id": root / "id.npy",
        "labels": root / "labels.npy",
        "near": root / "near.safetensors",
        "far": root / "far.npz",
    }
    torch.save({"text": data["W"]}, paths["classes"])
    np.save(paths["id"], data["X_id"].numpy())
    np.save(paths["labels"], data["labels"].numpy())
    save_file({"image": data["near"], "other": torch.zeros(2)}, str(paths["near"]))
    np.savez(paths["far"], feats=data["far"].numpy())
    return paths


def run_eval(files, out, *extra):
    argv = [
        "eval", "--id", str(files["id"]), "--classes", str(files["classes"]),
        "--ood", f"near={files['near']}:image", "--ood", f"far={files['far']}",
        "--id-labels", str(files["labels"]), "--temperature", str(TAU), "--c", str(C),
        "--backend", "reference", "--quiet", "--out", str(out), *extra,
    ]
    return cli.main(argv)


def direct_scores(data, name):
    X = data["X_id"] if name == "ID" else data[name]
    modes = dk.score_modes(X, data["W"], temperature=TAU, c=C, backend="reference")
    cols = {
        "delta_energy": modes["separate"].delta_energy,
        "delta_energy_joint": modes["joint"].delta_energy,
        "energy": modes["separate"].energy,
        "msp": modes["separate"].msp,
        "mcm": dk.mcm(X, data["W"], temperature=1.0, backend="reference"),
        "max_logit": modes["separate"].max_logit,
    }
    # ΔEnergy at c' <= C from the same pass: prefix sums of the separate terms, joint columns
    sep_terms = modes["separate"].delta_energy_terms.double()
    for c in range(1, C + 1):
        cols[f"delta_energy@c={c}"] = sep_terms[:, :c].sum(1).float()
        cols[f"delta_energy_joint@c={c}"] = modes["joint"].delta_energy_terms[:, c - 1]
    return cols, modes["separate"].pred


def test_eval_files_report_agrees_with_metrics(tmp_path, files, data, capsys):
    out = tmp_path / "report"
    assert run_eval(files, out) == 0
    printed = capsys.readouterr().out
    assert "AUROC" in printed and "ΔEnergy (joint)" in printed and "ID top-1 accuracy" in printed

    doc = json.loads((out / "metrics.json").read_text())
    assert doc["deltakern"] == dk.__version__
    assert doc["settings"]["c"] == C and doc["settings"]["temperature"] == TAU
    assert doc["ood_sets"] == ["near", "far"]
    assert {"auroc", "fpr95", "aupr_in", "aupr_out", "fpr95_ood_positive"} <= set(doc["conventions"])
    # inputs: sha256 of the files and shapes
    for key, path in (("classes", files["classes"]), ("ID", files["id"]), ("OOD near", files["near"]),
                      ("OOD far", files["far"]), ("id_labels", files["labels"])):
        assert doc["inputs"][key]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert doc["inputs"]["ID"]["shape"] == list(data["X_id"].shape)
    assert doc["inputs"]["OOD near"]["key"] == "image"

    id_cols, pred = direct_scores(data, "ID")
    ood_cols = {name: direct_scores(data, name)[0] for name in ("near", "far")}
    expected_scores = list(evaluation.SCORE_LABELS) + [f"{b}@c={c}" for b in evaluation.SWEEP_BASES for c in range(1, C + 1)]
    assert doc["scores"] == expected_scores
    assert len(doc["results"]) == len(expected_scores) * 2
    for row in doc["results"]:
        want = dk.metrics.ood_metrics(id_cols[row["score"]], ood_cols[row["ood_set"]][row["score"]])
        for key, value in want.items():
            assert row[key] == pytest.approx(value, rel=1e-12, abs=1e-12), (row["score"], row["ood_set"], key)
    for mean in doc["means"]:
        rows = [r for r in doc["results"] if r["score"] == mean["score"]]
        assert mean["ood_set"] == "mean"
        for key in ("auroc", "fpr95", "aupr_in", "aupr_out", "fpr95_ood_positive"):
            assert mean[key] == pytest.approx(sum(r[key] for r in rows) / len(rows), rel=1e-15)
    assert doc["id_accuracy"] == pytest.approx(dk.metrics.accuracy(pred, data["labels"]))

    # CSV: every record, full precision
    with open(out / "metrics.csv", newline="") as fh:
        records = list(csv.DictReader(fh))
    assert len(records) == len(doc["results"]) + len(doc["means"])
    first = doc["results"][0]
    assert float(records[0]["auroc"]) == first["auroc"] and records[0]["score"] == first["score"]

    md = (out / "report.md").read_text()
    assert "| ΔEnergy (separate) | near" in md and "effect of c" in md
    pngs = sorted(p.name for p in out.glob("*.png"))
    expected_pngs = [f"hist_{s}.png" for s in evaluation.SCORE_LABELS] + ["roc_near.png", "roc_far.png", "c_effect.png"]
    if importlib.util.find_spec("matplotlib") is None:  # the plots extra: skipped, and the report says so
        assert pngs == [] and doc["plots"] == "skipped: matplotlib is not installed (pip install matplotlib)"
    else:
        assert sorted(expected_pngs) == pngs
        assert doc["plots"] == [p for p in doc["plots"] if p in pngs] and len(doc["plots"]) == len(pngs)
    for name in pngs:
        with Image.open(out / name) as img:
            img.verify()
            assert img.format == "PNG" and img.size[0] > 100
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


def oracle_columns(X, W, *, temperature, c, reset, mcm_temperature):
    """Every score column of `deltakern eval` from the float64 oracle (tests/oracle.py)."""
    sep = scores64(X, W, temperature=temperature, c=c, reset=reset, mode="separate")
    joint = scores64(X, W, temperature=temperature, c=c, reset=reset, mode="joint")
    cols = {
        "delta_energy": sep["delta_energy"], "delta_energy_joint": joint["delta_energy"],
        "energy": sep["energy"], "msp": sep["msp"], "max_logit": sep["max_logit"],
        "mcm": scores64(X, W, temperature=mcm_temperature)["msp"],
    }
    for k in range(1, c + 1):
        cols[f"delta_energy@c={k}"] = sep["delta_energy_terms"][:, :k].sum(1)
        cols[f"delta_energy_joint@c={k}"] = joint["delta_energy_terms"][:, k - 1]
    return cols


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_eval_non_default_settings_against_the_float64_oracle(tmp_path, files, data, backend):
    # Every setting away from its default, and chunks that do not divide any set, so that a
    # CLI that ignores --reset, --temperature, --c or --mcm-temperature, or loses rows at the
    # chunk edges, reports other numbers than the oracle's.
    settings = dict(temperature=0.03, c=3, reset=0.15, mcm_temperature=0.5)
    out = tmp_path / "report"
    argv = [
        "eval", "--id", str(files["id"]), "--classes", str(files["classes"]),
        "--ood", f"near={files['near']}:image", "--ood", f"far={files['far']}",
        "--temperature", "0.03", "--c", "3", "--reset", "0.15", "--mcm-temperature", "0.5",
        "--chunk-rows", "37", "--backend", backend, "--quiet", "--no-plots", "--out", str(out),
    ]
    assert cli.main(argv) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["settings"]["reset"] == 0.15 and doc["settings"]["c"] == 3
    sets = {"ID": data["X_id"], "near": data["near"], "far": data["far"]}
    assert all(X.shape[0] % 37 for X in sets.values())
    want_cols = {name: oracle_columns(X, data["W"], **settings) for name, X in sets.items()}
    assert len(doc["results"]) == len(want_cols["ID"]) * 2
    for row in doc["results"]:
        want = dk.metrics.ood_metrics(want_cols["ID"][row["score"]], want_cols[row["ood_set"]][row["score"]])
        what = (row["score"], row["ood_set"])
        assert (row["n_id"], row["n_ood"]) == (want["n_id"], want["n_ood"]), what
        # The threshold is an order statistic of the ID scores: it moves by no more than the
        # largest score error, so it sits within the accuracy contract of the oracle's (5e-4:
        # the c' sums add up to three float32 terms).
        tol = 5e-4 * max(1.0, abs(want["threshold"]))
        assert abs(row["threshold"] - want["threshold"]) <= tol, (what, row["threshold"], want["threshold"])
        assert row["auroc"] == pytest.approx(want["auroc"], abs=2e-3), what


def test_eval_matmul_precision_reaches_the_scores(tmp_path, files, monkeypatch):
    """--matmul-precision medium with the bfloat16 GEMM forced (DELTAKERN_CPU_HALF_GEMM=mkl)
    scores with bf16 products: other thresholds than highest's, and the setting is recorded."""
    if "cpp" not in dk.available_backends("cpu"):
        pytest.skip("needs the compiled CPU op")
    monkeypatch.setenv("DELTAKERN_CPU_HALF_GEMM", "mkl")
    docs = {}
    for precision in ("highest", "medium"):
        out = tmp_path / precision
        argv = ["eval", "--id", str(files["id"]), "--classes", str(files["classes"]), "--ood", f"far={files['far']}",
                "--backend", "cpp", "--matmul-precision", precision, "--quiet", "--no-plots", "--out", str(out)]
        assert cli.main(argv) == 0
        docs[precision] = json.loads((out / "metrics.json").read_text())
        assert docs[precision]["settings"]["matmul_precision"] == precision
    thresholds = {p: {row["score"]: row["threshold"] for row in d["results"]} for p, d in docs.items()}
    assert thresholds["highest"].keys() == thresholds["medium"].keys()
    for score, value in thresholds["highest"].items():  # every score, not only one of the calls
        assert thresholds["medium"][score] != value, score


def test_eval_positive_ood_changes_the_fpr_column(tmp_path, files, capsys):
    assert run_eval(files, tmp_path / "o", "--positive", "ood", "--no-plots", "--c", "1") == 0
    assert "(OOD+)" in capsys.readouterr().out
    doc = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert doc["fpr_column"] == "fpr95_ood_positive" and doc["plots"] == "skipped: disabled"
    assert not list((tmp_path / "o").glob("*.png"))


def test_eval_synthetic_source(tmp_path, capsys):
    out = tmp_path / "syn"
    argv = ["eval", "--synthetic", "--n", "400", "--k", "10", "--d", "16", "--c", "3", "--quiet",
            "--backend", "reference", "--out", str(out), "--no-plots"]
    assert cli.main(argv) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["ood_sets"] == ["synthetic"]
    assert doc["inputs"]["ID"]["shape"][0] + doc["inputs"]["OOD synthetic"]["shape"][0] == 400
    s = make_synthetic(400, 10, 16, 0, 0.5)
    sep = dk.score(s.X, s.W, c=3, backend="reference")
    want = dk.metrics.ood_metrics(sep.delta_energy[~s.is_ood], sep.delta_energy[s.is_ood])
    got = next(r for r in doc["results"] if r["score"] == "delta_energy")
    assert got["auroc"] == pytest.approx(want["auroc"], rel=1e-12)
    assert doc["id_accuracy"] == pytest.approx(dk.metrics.accuracy(sep.pred[~s.is_ood], s.labels[~s.is_ood]))
    assert "ΔEnergy mode" in capsys.readouterr().out  # the c = 1..3 table


@pytest.mark.parametrize(
    "argv,words",
    [
        (["eval", "--id", "x.npy"], ["--ood", "--classes", "required"]),
        (["eval", "--synthetic", "--id", "x.npy"], ["--synthetic", "--id"]),
    ],
)
def test_eval_usage_errors(argv, words, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err


def test_eval_file_errors_name_the_flag(tmp_path, files, capsys):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((5, 7), np.float32))  # D = 7, classes have 16
    argv = ["eval", "--id", str(files["id"]), "--classes", str(files["classes"]), "--ood", f"bad={bad}", "--quiet"]
    assert cli.main(argv) == 2
    assert "--ood bad" in capsys.readouterr().err
    argv[argv.index(f"bad={bad}")] = f"near={files['near']}"  # two arrays and no key
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--ood near" in err and "image" in err and "other" in err
    argv[argv.index(f"near={files['near']}")] = f"gone={tmp_path / 'missing.npy'}"
    assert cli.main(argv) == 2
    assert "no such file" in capsys.readouterr().err


def test_io_loaders(tmp_path, data):
    pt = tmp_path / "single.pt"
    torch.save(data["W"].half(), pt)
    assert io.load_embeddings(pt).dtype == torch.float16
    txt = tmp_path / "y.txt"
    txt.write_text("1")
    with pytest.raises(ValueError, match="unsupported suffix"):
        io.load_array(txt)
    labels = tmp_path / "labels.npy"
    np.save(labels, np.arange(4, dtype=np.float32))
    with pytest.raises(TypeError, match="integer"):
        io.load_labels(labels, name="--id-labels")
    np.save(labels, np.arange(4))
    with pytest.raises(ValueError, match="--id-labels.*3 labels"):
        io.load_labels(labels, name="--id-labels", n=3)
    assert io.split_key(f"{pt}:key") == (pt, "key") and io.split_key(pt) == (pt, None)


def test_evaluate_sets_api_and_tables(data):
    rng = np.random.default_rng(0)
    id_scores = {"a": rng.normal(1, 1, 300), "b": torch.from_numpy(rng.normal(0.5, 1, 300))}
    ood_scores = {name: {"a": rng.normal(0, 1, 200 + i), "b": torch.from_numpy(rng.normal(0, 1, 200 + i))}
                  for i, name in enumerate(["s1", "s2", "s3"])}
    ev = evaluation.evaluate_sets(id_scores, ood_scores, positive="ood")
    for score in ("a", "b"):
        for name in ood_scores:
            assert ev.result(score, name)["fpr95_ood_positive"] == dk.metrics.fpr_at_tpr(
                id_scores[score], ood_scores[name][score], positive="ood"
            )
        mean = ev.result(score, "mean")["auroc"]
        assert mean == pytest.approx(np.mean([dk.metrics.auroc(id_scores[score], ood_scores[n][score]) for n in ood_scores]))
    text = ev.table()
    assert "mean" in text and "FPR95↓ (OOD+)" in text and ev.id_accuracy is None
    row = ev.table_rows()[3]  # score a, the mean over the three sets
    assert row[1] == "mean" and math.isclose(row[2], 100 * ev.result("a", "mean")["auroc"])
    with pytest.raises(ValueError, match="ood_scores\\['s2'\\] has no score 'c'"):
        evaluation.evaluate_sets({"c": [1.0]}, {"s1": {"c": [0.0]}, "s2": {"a": [0.0]}})
    with pytest.raises(ValueError, match="positive"):
        evaluation.evaluate_sets(id_scores, ood_scores, positive="both")


def test_delta_energy_by_c_matches_separate_passes(data):
    X, W = data["X_id"][:50], data["W"]
    for mode in ("separate", "joint"):
        full = dk.score(X, W, c=4, mode=mode, temperature=TAU, backend="reference")
        by_c = evaluation.delta_energy_by_c(full.delta_energy_terms, mode)
        for c in range(1, 5):
            own = dk.score(X, W, c=c, mode=mode, temperature=TAU, backend="reference").delta_energy
            torch.testing.assert_close(by_c[:, c - 1], own, rtol=1e-5, atol=1e-5)


def test_eval_neglabel_row_from_the_same_calls(tmp_path, files, data, capsys):
    """`--negatives` adds a NegLabel row whose metrics are those of the float64 definition."""
    from test_neglabel_scores import neglabel64

    g = torch.Generator().manual_seed(11)
    negatives = torch.randn(30, data["W"].shape[1], generator=g)
    path = tmp_path / "negatives.npy"
    np.save(path, negatives.numpy())
    out = tmp_path / "report"
    assert run_eval(files, out, "--negatives", str(path), "--negative-groups", "3", "--chunk-rows", "41", "--no-plots") == 0
    assert "NegLabel" in capsys.readouterr().out
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["settings"]["negative_groups"] == 3 and doc["inputs"]["negatives"]["shape"] == [30, data["W"].shape[1]]
    rows = {r["ood_set"]: r for r in doc["results"] if r["score"] == "neglabel"}
    assert set(rows) == {"near", "far"}
    want_id = neglabel64(data["X_id"], data["W"], negatives, temperature=TAU, groups=3)
    for name in ("near", "far"):
        want = dk.metrics.ood_metrics(want_id, neglabel64(data[name], data["W"], negatives, temperature=TAU, groups=3))
        assert rows[name]["auroc"] == pytest.approx(want["auroc"], abs=2e-3)
        assert rows[name]["threshold"] == pytest.approx(want["threshold"], rel=1e-4, abs=1e-4)


# ---- --negative-labels: NegLabel mined from a vocabulary with the tiny model ------------------

NEG_CLASSES = ["cat", "dog", "bird", "fish", "car", "tree", "boat"]
# 12 lines, 10 usable: "river" repeats and "Cat" is an ID class
NEG_VOCAB = ["river", "violin", "cloud", "spoon", "harbour", "Cat", "lamp", "desert", "anchor", "tulip", "river", "comet"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Class embeddings of the tiny random-weight model for NEG_CLASSES ('single' template),
    image embeddings near them (ID) and random ones (OOD), the class names and a vocabulary."""
    pytest.importorskip("open_clip")
    import warnings
    from types import SimpleNamespace

    from deltakern.clip import zeroshot
    from deltakern.clip.models import TINY_MODEL, load_model

    root = tmp_path_factory.mktemp("eval_neglabel")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_model(TINY_MODEL, "none", device="cpu", seed=0)
    W = zeroshot.build_class_embeddings(clip.model, clip.tokenizer, NEG_CLASSES, zeroshot.template_preset("single"))
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, len(NEG_CLASSES), (90,), generator=g)
    X_id = torch.nn.functional.normalize(W[labels] + 0.05 * torch.randn(90, W.shape[1], generator=g), dim=1)
    X_ood = torch.nn.functional.normalize(torch.randn(70, W.shape[1], generator=g), dim=1)
    w = SimpleNamespace(root=root, clip=clip, W=W, X_id=X_id, X_ood=X_ood, model=TINY_MODEL,
                        classes=root / "classes.npy", id=root / "id.npy", ood=root / "ood.npy",
                        names=root / "names.txt", vocab=root / "vocab.txt")
    np.save(w.classes, W.numpy())
    np.save(w.id, X_id.numpy())
    np.save(w.ood, X_ood.numpy())
    w.names.write_text("\n".join(NEG_CLASSES) + "\n")
    w.vocab.write_text("\n".join(NEG_VOCAB) + "\n")
    return w


def neg_argv(w, out, cache, *extra, vocab=True, names=True):
    return [
        "eval", "--id", str(w.id), "--classes", str(w.classes), "--ood", f"far={w.ood}",
        "--temperature", str(TAU), "--c", str(C), "--backend", "reference", "--device", "cpu",
        "--quiet", "--no-plots", "--out", str(out), "--model", w.model, "--pretrained", "none",
        "--templates", "single", "--cache-dir", str(cache),
        *(["--negative-labels", str(w.vocab)] if vocab else []),
        *(["--class-names", str(w.names)] if names else []), *extra,
    ]  # fmt: skip


def neglabel_rows(out) -> dict:
    doc = json.loads((out / "metrics.json").read_text())
    return {r["ood_set"]: r for r in doc["results"] if r["score"] == "neglabel"}


def test_eval_negative_labels_row_equals_direct_mining(tmp_path, tiny, capsys):
    """The NegLabel row of `--negative-labels` is that of dk.score with the negatives that
    mine_negative_labels gives for the same model, class names, vocabulary, templates, M and
    precision (the run's default `--precision auto`: bf16 autocast on CPUs with native bf16)."""
    from deltakern.clip import zeroshot
    from deltakern.clip.negatives import mine_negative_labels
    from deltakern.runtime.devices import autocast_dtype, resolve_precision

    out = tmp_path / "report"
    assert cli.main(neg_argv(tiny, out, tmp_path / "cache", "--n-negative", "6", "--negative-groups", "3")) == 0
    assert "NegLabel" in capsys.readouterr().out
    # mined again from scratch (its own cache), not read back from the run's cache
    mined = mine_negative_labels(tiny.clip, NEG_CLASSES, tiny.vocab, 6, zeroshot.template_preset("single"),
                                 cache_dir=tmp_path / "direct",
                                 autocast_dtype=autocast_dtype(resolve_precision("auto", torch.device("cpu"))))  # fmt: skip
    scores = {name: dk.score(X, tiny.W, temperature=TAU, c=C, backend="reference", negatives=mined.embeddings,
                             negative_groups=3).neglabel for name, X in (("ID", tiny.X_id), ("far", tiny.X_ood))}  # fmt: skip
    want = dk.metrics.ood_metrics(scores["ID"], scores["far"])
    rows = neglabel_rows(out)
    assert set(rows) == {"far"}
    for key, value in want.items():
        assert rows["far"][key] == pytest.approx(value, rel=1e-12, abs=1e-12), key

    doc = json.loads((out / "metrics.json").read_text())
    source = doc["settings"]["negative_labels"]
    assert source["vocabulary_sha256"] == hashlib.sha256(tiny.vocab.read_bytes()).hexdigest()
    assert (source["n_negative"], source["negative_groups"], source["usable_vocabulary"]) == (6, 3, 10)
    assert (source["model"], source["pretrained"], source["templates"]) == (tiny.model, "none", "single")
    assert source["names"] == mined.names and "Cat" not in source["names"]
    assert doc["settings"]["negative_groups"] == 3
    assert doc["inputs"]["negatives"]["shape"] == [6, tiny.W.shape[1]]


def test_eval_negative_labels_second_run_reads_the_cache(tmp_path, tiny, monkeypatch):
    import deltakern.clip.models as models_module
    import deltakern.clip.negatives as negatives_module

    cache = tmp_path / "cache"
    assert cli.main(neg_argv(tiny, tmp_path / "a", cache, "--n-negative", "4")) == 0
    entries = list(cache.glob("negatives-*.safetensors"))
    assert len(entries) == 1
    stamp = entries[0].stat().st_mtime_ns

    def no_mining(*args, **kwargs):
        raise AssertionError("the negative labels were mined again instead of read from the cache")

    def no_model(*args, **kwargs):
        raise AssertionError("the text encoder was loaded although its negative labels are cached")

    monkeypatch.setattr(negatives_module, "build_class_embeddings", no_mining)
    monkeypatch.setattr(negatives_module, "cached_class_embeddings", no_mining)
    monkeypatch.setattr(models_module, "load_model", no_model)
    assert cli.main(neg_argv(tiny, tmp_path / "b", cache, "--n-negative", "4")) == 0
    assert list(cache.glob("negatives-*.safetensors")) == entries and entries[0].stat().st_mtime_ns == stamp
    assert neglabel_rows(tmp_path / "b") == neglabel_rows(tmp_path / "a")


def test_eval_negative_labels_and_negatives_exclude_each_other(tmp_path, tiny, capsys):
    neg = tmp_path / "neg.npy"
    np.save(neg, np.ones((3, tiny.W.shape[1]), np.float32))
    with pytest.raises(SystemExit) as exc:
        cli.main(neg_argv(tiny, tmp_path / "o", tmp_path / "cache", "--negatives", str(neg)))
    assert exc.value.code == 2
    assert "error: argument --negatives: not allowed with argument --negative-labels" in capsys.readouterr().err


@pytest.mark.parametrize(
    "case,words",
    [
        ("no class names", ["--negative-labels needs --class-names"]),
        ("n_negative above the vocabulary", ["argument --n-negative", "exceeds the 10 usable entries"]),
        ("class names count", ["--class-names lists 6 classes", "K = 7"]),
        ("encoder flags without a vocabulary", ["--model, --pretrained", "only serve --negative-labels"]),
        ("synthetic", ["--synthetic has neither"]),
    ],
)
def test_eval_negative_labels_errors_before_the_model_loads(tmp_path, tiny, capsys, monkeypatch, case, words):
    import deltakern.clip.models as models

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", no_model)
    argv = neg_argv(tiny, tmp_path / "o", tmp_path / "cache", names=case != "no class names",
                    vocab=case != "encoder flags without a vocabulary")  # fmt: skip
    if case == "n_negative above the vocabulary":
        argv += ["--n-negative", "11"]
    elif case == "class names count":
        short = tmp_path / "names6.txt"
        short.write_text("\n".join(NEG_CLASSES[:6]) + "\n")
        argv[argv.index(str(tiny.names))] = str(short)
        argv += ["--n-negative", "4"]
    elif case == "synthetic":
        argv = ["eval", "--synthetic", "--n", "100", "--k", "5", "--d", "16", "--negative-labels", str(tiny.vocab), "--n-negative", "4",
                "--model", tiny.model, "--pretrained", "none", "--class-names", str(tiny.names)]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (case, err)


def test_eval_negative_labels_width_must_match_the_embeddings(tmp_path, tiny, files, capsys):
    # The synthetic files have D = 16; the tiny model embeds text in 64 dimensions.
    names = tmp_path / "names12.txt"
    names.write_text("\n".join(f"class {i}" for i in range(12)) + "\n")
    argv = ["eval", "--id", str(files["id"]), "--classes", str(files["classes"]), "--ood", f"far={files['far']}",
            "--negative-labels", str(tiny.vocab), "--n-negative", "3", "--model", tiny.model, "--pretrained", "none",
            "--class-names", str(names), "--templates", "single", "--cache-dir", str(tmp_path / "cache"), "--quiet"]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"--model {tiny.model} --pretrained none embeds text in D = 64" in err and "D = 16" in err
    assert not list((tmp_path / "cache").glob("negatives-*"))  # refused before mining


def test_eval_help_explains_the_negative_label_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    text = capsys.readouterr().out
    for flag in ("--negative-labels VOCAB", "--n-negative", "--negative-groups", "--class-names FILE", "--model",
                 "--pretrained", "--templates", "--cache-dir"):  # fmt: skip
        assert flag in text, flag
