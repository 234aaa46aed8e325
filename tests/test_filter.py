"""`deltakern calibrate` -> `deltakern filter` on the output of a real `deltakern score --features`
run: the kept rows are exactly those a direct pyarrow filter keeps, counts are exact, batches
do not matter, outputs are atomic, and a threshold fitted for other settings is refused."""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip")
pa = pytest.importorskip("pyarrow")
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from deltakern import cli  # noqa: E402
from deltakern.cli.commands.filter import filter_scores  # noqa: E402
from deltakern.clip.models import TINY_MODEL  # noqa: E402
from deltakern.data.atomic import write_json  # noqa: E402
from deltakern.data.features import write_feature_shard  # noqa: E402
from deltakern.ood.threshold import load_threshold  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _scored import write_scored  # noqa: E402

CLASSES = ["cat", "dog", "bird", "fish", "car", "tree"]


def write_features(directory: Path, n: int, seed: int, shift: float = 0.0) -> Path:
    """A finished `deltakern encode` output of n random 64-d features (the tiny model's width)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 64, generator=g) + shift
    shards = []
    for i, lo in enumerate(range(0, n, 40)):
        rows = X[lo : lo + 40]
        ids = [f"{directory.name}/{j:04d}.jpg" for j in range(lo, lo + rows.shape[0])]
        write_feature_shard(directory / f"shard-{i:05d}.safetensors", rows, ids, [f"/imgs/{x}" for x in ids])
        shards.append({"index": i, "file": f"shard-{i:05d}.safetensors", "rows": rows.shape[0]})
    write_json(directory / "manifest.json", {
        "kind": "deltakern-features", "version": 1, "args": {"task": "encode"},
        "model": {"model": TINY_MODEL, "pretrained": "none", "weights": "none"}, "embed_dim": 64,
        "dtype": "float32", "normalized": False, "count": n, "images": n, "shards": shards, "errors": [],
    })  # fmt: skip
    return directory


def score(features: Path, out: Path, cache: Path, classes: Path, *extra: str) -> Path:
    argv = ["score", "--features", str(features), "--classes", str(classes), "--templates", "single",
            "--pretrained", "none", "--device", "cpu", "--no-progress", "--cache-dir", str(cache), "--out", str(out), *extra]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights warning
        assert cli.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("filter")
    classes = root / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    cache = root / "cache"
    id_feats = write_features(root / "id_feats", 230, seed=0)
    ood_feats = write_features(root / "ood_feats", 150, seed=1, shift=0.3)
    return {
        "root": root,
        "id": score(id_feats, root / "id.parquet", cache, classes, "--c", "2"),
        "ood": score(ood_feats, root / "ood.parquet", cache, classes, "--c", "2"),
        "id_c3": score(id_feats, root / "id_c3.parquet", cache, classes, "--c", "3"),
    }


def _counts(printed: str) -> tuple[int, int, int]:
    m = re.search(r"kept (\d+) of (\d+) rows.*rejected (\d+)", printed)
    assert m, printed
    return int(m[1]), int(m[2]), int(m[3])


@pytest.mark.parametrize("source", ["file", "parts"])
def test_calibrate_then_filter_keeps_exactly_the_rows_above_the_threshold(runs, tmp_path, capsys, source):
    T = tmp_path / "T.json"
    assert cli.main(["calibrate", str(runs["id"]), "--ood", str(runs["ood"]), "--out", str(T)]) == 0
    capsys.readouterr()
    threshold = load_threshold(T)
    assert threshold.identity.c == 2 and threshold.identity.model == TINY_MODEL
    scores = runs["id"] if source == "file" else runs["id"].with_suffix(".parts")
    kept, rejected, listing = tmp_path / "kept.parquet", tmp_path / "rejected.parquet", tmp_path / "kept.txt"
    argv = ["filter", str(scores), "--threshold", str(T), "--out", str(kept), "--rejected", str(rejected),
            "--list", str(listing), "--batch-rows", "17"]  # fmt: skip
    assert cli.main(argv) == 0
    n_kept, n_rows, n_rejected = _counts(capsys.readouterr().out)

    table = pq.read_table(runs["id"])
    mask = pc.greater_equal(table.column("delta_energy"), threshold.value)
    expected_kept, expected_rejected = table.filter(mask), table.filter(pc.invert(mask))
    assert pq.read_table(kept).equals(expected_kept)
    assert pq.read_table(rejected).equals(expected_rejected)
    assert listing.read_text().splitlines() == expected_kept.column("source").to_pylist()
    assert (n_kept, n_rows, n_rejected) == (expected_kept.num_rows, table.num_rows, expected_rejected.num_rows)
    assert n_kept / n_rows == threshold.id_acceptance >= 0.95
    # The kept file is itself a scored output: its manifest carries the settings.
    manifest = json.loads(kept.with_suffix(".manifest.json").read_text())
    assert manifest["args"]["c"] == 2 and manifest["rows"] == n_kept
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["T.json", "kept.parquet", "kept.manifest.json", "rejected.parquet", "rejected.manifest.json", "kept.txt"]
    )


def test_a_threshold_for_other_settings_is_refused(runs, tmp_path, capsys):
    T = tmp_path / "T3.json"
    assert cli.main(["calibrate", str(runs["id_c3"]), "--out", str(T)]) == 0
    kept = tmp_path / "kept.parquet"
    assert cli.main(["filter", str(runs["id"]), "--threshold", str(T), "--out", str(kept)]) == 2
    err = capsys.readouterr().err
    assert "argument --threshold" in err and "c 3 != 2" in err
    assert not kept.exists() and list(tmp_path.iterdir()) == [T]
    # an energy threshold does not depend on c: the c = 3 run's energy threshold applies to c = 2
    assert cli.main(["calibrate", str(runs["id_c3"]), "--score", "energy", "--out", str(T)]) == 0
    assert cli.main(["filter", str(runs["id"]), "--threshold", str(T), "--out", str(kept)]) == 0


def test_batches_do_not_matter_and_bad_outputs_are_refused(tmp_path, capsys):
    scored = write_scored(tmp_path / "s.parquet", 5000, seed=4, parts=4)
    T = tmp_path / "T.json"
    assert cli.main(["calibrate", str(scored), "--target-tpr", "0.5", "--out", str(T)]) == 0
    threshold = load_threshold(T)
    outs = []
    for batch in (1, 333, 1 << 20):
        out = tmp_path / f"kept_{batch}.parquet"
        counts = filter_scores(scored.with_suffix(".parts"), threshold, out, batch_rows=batch)
        outs.append(pq.read_table(out))
        assert counts["kept"] == outs[-1].num_rows and counts["rows"] == 5000
    assert outs[0].equals(outs[1]) and outs[1].equals(outs[2])
    # ties at the threshold (scores are multiples of 0.25) are all kept
    assert outs[0].num_rows == pc.sum(pc.greater_equal(pq.read_table(scored).column("delta_energy"), threshold.value)).as_py()
    capsys.readouterr()
    assert cli.main(["filter", str(scored), "--threshold", str(T), "--out", str(scored)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert cli.main(["filter", str(tmp_path / "none.parquet"), "--threshold", str(T), "--out", str(tmp_path / "k.parquet")]) == 2
    assert cli.main(["filter", str(scored), "--threshold", str(tmp_path / "none.json"), "--out", str(tmp_path / "k.parquet")]) == 2
    assert "argument --threshold" in capsys.readouterr().err


def test_a_failure_mid_stream_leaves_no_output(tmp_path, monkeypatch):
    from deltakern.cli.commands import filter as filter_module

    scored = write_scored(tmp_path / "in" / "s.parquet", 3000, seed=5)
    threshold_path = tmp_path / "in" / "T.json"
    assert cli.main(["calibrate", str(scored), "--out", str(threshold_path)]) == 0
    real = filter_module.iter_batches

    def failing(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 2:
                raise OSError("disk gone")
            yield batch

    monkeypatch.setattr(filter_module, "iter_batches", failing)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk gone"):
        filter_scores(scored, load_threshold(threshold_path), out / "kept.parquet", rejected=out / "rej.parquet",
                      kept_list=out / "kept.txt", batch_rows=500)  # fmt: skip
    assert list(out.iterdir()) == []  # neither outputs nor temporary files
