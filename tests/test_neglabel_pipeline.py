"""`deltakern score --negative-labels`: the parquet's neglabel column against a float64
evaluation with the mined negatives, the other columns unchanged, the run's identity."""

from __future__ import annotations

import json
import types
import warnings

import pytest
import torch

pytest.importorskip("open_clip")
pq = pytest.importorskip("pyarrow.parquet")

from _images import make_image_folder  # noqa: E402
from oracle import assert_close_contract  # noqa: E402
from test_neglabel_scores import neglabel64  # noqa: E402
from test_pipeline import CLASSES, common, feature_matrix, run_cli  # noqa: E402

from deltakern.clip import zeroshot  # noqa: E402
from deltakern.clip.models import TINY_MODEL, load_model  # noqa: E402
from deltakern.clip.negatives import mine_negative_labels  # noqa: E402
from deltakern.runtime.devices import autocast_dtype  # noqa: E402

VOCAB = ["river", "violin", "cloud", "spoon", "harbour", "Cat", "lamp", "desert", "anchor", "tulip", "river", "comet"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("neglabel")
    make_image_folder(root / "images", 12)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    w = types.SimpleNamespace(root=root, images=root / "images", classes=root / "classes.txt", cache=root / "cache")
    assert run_cli(["encode", *common(w), "--images", str(w.images), "--dtype", "float32", "--out", str(root / "feats")]) == 0
    return w


def score_argv(w, out, *extra):
    return [
        "score", *common(w), "--features", str(w.root / "feats"), "--classes", str(w.classes), "--templates", "single",
        "--c", "2", "--cache-dir", str(w.cache), "--out", str(out), *extra,
    ]  # fmt: skip


def test_neglabel_column_against_float64(work):
    out = work.root / "neg" / "scores.parquet"
    assert run_cli(score_argv(work, out, "--negative-labels", str(work.root / "vocab.txt"), "--n-negative", "6",
                              "--negative-groups", "3")) == 0  # fmt: skip
    table = pq.read_table(out)
    plain_out = work.root / "plain" / "scores.parquet"
    assert run_cli(score_argv(work, plain_out)) == 0
    plain = pq.read_table(plain_out)
    assert "neglabel" in table.column_names and "neglabel" not in plain.column_names
    assert table.drop(["neglabel"]).equals(plain)  # the ID columns are not touched by the negatives

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_model(TINY_MODEL, "none", device="cpu", seed=0)
    manifest = json.loads(out.with_suffix(".manifest.json").read_text())
    # The text embeddings at the run's precision (`--precision auto`: bf16 autocast on CPUs with
    # native bf16), as the manifest records it.
    dtype = autocast_dtype(manifest["args"]["precision"])
    mined = mine_negative_labels(clip, CLASSES, work.root / "vocab.txt", 6, zeroshot.template_preset("single"),
                                 cache_dir=work.cache, autocast_dtype=dtype)  # fmt: skip
    assert manifest["negative_labels"]["names"] == mined.names and manifest["negative_labels"]["groups"] == 3
    X, _ = feature_matrix(work.root / "feats")
    W = zeroshot.build_class_embeddings(clip.model, clip.tokenizer, CLASSES, zeroshot.template_preset("single"),
                                        autocast_dtype=dtype)  # fmt: skip
    want = neglabel64(X, W, mined.embeddings, temperature=0.01, groups=3)
    assert_close_contract(torch.tensor(table.column("neglabel").to_pylist()), want, torch.float32, "neglabel")


def test_a_changed_vocabulary_is_refused_and_checked_before_the_model(work, capsys):
    out = work.root / "refuse" / "scores.parquet"
    vocab = work.root / "vocab2.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    assert run_cli(score_argv(work, out, "--negative-labels", str(vocab), "--n-negative", "4")) == 0
    vocab.write_text("\n".join(VOCAB + ["glacier"]) + "\n")
    capsys.readouterr()
    assert run_cli(score_argv(work, out, "--negative-labels", str(vocab), "--n-negative", "4")) == 2
    assert "the negative-label vocabulary (--negative-labels) changed" in capsys.readouterr().err
    assert run_cli(score_argv(work, work.root / "x" / "s.parquet", "--negative-labels", str(vocab), "--n-negative", "99")) == 2
    assert "argument --n-negative: n_negative=99 exceeds the 11 usable entries" in capsys.readouterr().err
