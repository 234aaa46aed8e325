"""encode -> score -> parquet: rows, decode errors, agreement with dk.score, resume after a kill,
refusal of changed arguments, torchrun with two ranks, webdataset input, file lists, --prompts.

Offline and on CPU: the tiny registered open_clip model with random weights (--pretrained none).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch

pytest.importorskip("open_clip")
pq = pytest.importorskip("pyarrow.parquet")

import deltakern as dk  # noqa: E402
from deltakern import cli, pipeline  # noqa: E402
from deltakern.clip import zeroshot  # noqa: E402
from deltakern.clip.models import TINY_MODEL, load_model  # noqa: E402
from deltakern.data import images as data  # noqa: E402
from deltakern.data.features import read_feature_shard  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _images import CORRUPT_ID, make_image_folder, make_tar_shards  # noqa: E402
from oracle import assert_close_contract, assert_indices_match, logits64  # noqa: E402

CLASSES = ["cat", "dog", "bird", "fish", "car", "tree", "boat"]
SHARD = 8
FLOAT_COLUMNS = ("delta_energy", "energy", "msp", "max_logit")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    images = root / "images"
    ids = make_image_folder(images, 50)
    classes = root / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    return types.SimpleNamespace(root=root, images=images, ids=ids, classes=classes, cache=root / "cache")


def common(work, *, workers: int = 0) -> list[str]:
    return [
        "--model", TINY_MODEL, "--pretrained", "none", "--shard-size", str(SHARD), "--batch-size", "5",
        "--workers", str(workers), "--device", "cpu", "--no-progress",
        # float32 like the oracles these runs are checked against ("auto" is bf16 autocast on CPUs
        # with native bf16; test_runs.py checks that the precision reaches the encoder)
        "--precision", "fp32",
    ]  # fmt: skip


def score_args(work, out: Path, *, source: list[str] | None = None, extra: tuple[str, ...] = (), workers: int = 0):
    source = source or ["--images", str(work.images)]
    return [
        "score", *common(work, workers=workers), *source, "--classes", str(work.classes), "--templates", "single",
        "--c", "2", "--cache-dir", str(work.cache), "--out", str(out), *extra,
    ]  # fmt: skip


def run_cli(argv: list[str]) -> int:
    """``deltakern ARGV`` in this process, with only the commands under test registered."""
    with warnings.catch_warnings(), mock.patch.dict(cli.COMMANDS, {"encode": "encode", "score": "score"}, clear=True):
        warnings.simplefilter("ignore")  # the random-weights warning
        return cli.main(argv)


def run_subprocess(argv: list[str], env_extra: dict | None = None, timeout: int = 150) -> subprocess.CompletedProcess:
    # Same thread settings as this process: bitwise equality across processes relies on them.
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def class_matrix(work) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_model(TINY_MODEL, "none")
    return zeroshot.build_class_embeddings(clip.model, clip.tokenizer, CLASSES, zeroshot.template_preset("single"))


def feature_matrix(directory: Path) -> tuple[torch.Tensor, list[str]]:
    manifest = json.loads((directory / "manifest.json").read_text())
    parts = [read_feature_shard(directory / s["file"]) for s in manifest["shards"]]
    return torch.cat([p[0] for p in parts]), [i for p in parts for i in p[1]]


def assert_rows_match_scores(table, X: torch.Tensor, W: torch.Tensor, c: int = 2) -> None:
    """The parquet's score columns equal dk.score(X, W) within the accuracy contract (docs/conventions.md §3)."""
    expected = dk.score(X, W, c=c)
    rows = table.to_pydict()
    for name in FLOAT_COLUMNS:
        assert_close_contract(torch.tensor(rows[name]), getattr(expected, name), torch.float32, name)
    ell = logits64(X, W, 0.01)
    assert_indices_match(torch.tensor(rows["topk_indices"]), expected.topk_indices, ell, torch.float32)
    assert_indices_match(torch.tensor(rows["pred"])[:, None], expected.pred[:, None], ell, torch.float32)
    assert rows["pred_name"] == [CLASSES[k] for k in rows["pred"]]


@pytest.fixture(scope="module")
def baseline(work):
    """An uninterrupted single-process score run over the folder (with DataLoader workers)."""
    out = work.root / "baseline" / "scores.parquet"
    assert run_cli(score_args(work, out, workers=2)) == 0
    return out


def test_score_folder_rows_errors_and_agreement_with_encode(work, baseline):
    table = pq.read_table(baseline)
    assert table.num_rows == 50
    assert table.column("id").to_pylist() == work.ids  # sorted order, corrupt file skipped
    manifest = json.loads(baseline.with_suffix(".manifest.json").read_text())
    assert manifest["rows"] == 50 and manifest["images"] == 51
    assert [e["id"] for e in manifest["errors"]] == [CORRUPT_ID]
    assert manifest["errors"][0]["error"] and manifest["errors"][0]["source"].endswith("corrupt.jpg")
    assert len(manifest["parts"]) == 7  # ceil(51 / 8)
    assert set(manifest["timing"]) == set(pipeline.TIMING_KEYS)
    assert manifest["last_run"]["images"] == 51 and manifest["last_run"]["shards_done_now"] == 7

    # encode (float32) then dk.score on those embeddings: the same scores as the streaming run.
    feats32 = work.root / "features32"
    assert run_cli(["encode", *common(work), "--images", str(work.images), "--dtype", "float32", "--out", str(feats32)]) == 0
    X32, ids = feature_matrix(feats32)
    assert ids == work.ids and X32.dtype == torch.float32
    enc_manifest = json.loads((feats32 / "manifest.json").read_text())
    assert enc_manifest["count"] == 50 and [e["id"] for e in enc_manifest["errors"]] == [CORRUPT_ID]
    torch.testing.assert_close(X32.norm(dim=1), torch.ones(50), rtol=0, atol=1e-5)
    W = class_matrix(work)
    assert_rows_match_scores(table, X32, W)

    # the default float16 features, scored with --features: dk.score on exactly those features.
    feats16 = work.root / "features16"
    assert run_cli(["encode", *common(work), "--images", str(work.images), "--out", str(feats16)]) == 0
    X16, _ = feature_matrix(feats16)
    assert X16.dtype == torch.float16
    out = work.root / "from_features" / "scores.parquet"
    assert run_cli(score_args(work, out, source=["--features", str(feats16)])) == 0
    from_features = pq.read_table(out)
    assert from_features.column("id").to_pylist() == work.ids
    assert_rows_match_scores(from_features, X16, W)
    manifest = json.loads(out.with_suffix(".manifest.json").read_text())
    assert [e["id"] for e in manifest["errors"]] == [CORRUPT_ID]  # carried over from the encode run


def test_killed_run_resumes_to_identical_output(work, baseline):
    out = work.root / "killed" / "scores.parquet"
    argv = [sys.executable, str(REPO / "tests" / "_crash.py"), "3", *score_args(work, out)]
    proc = run_subprocess(argv)
    assert proc.returncode == 75, proc.stderr
    parts = out.with_suffix(".parts")
    assert sorted(p.name for p in parts.glob("part-*.json")) == [f"part-0000{i}.json" for i in range(3)]
    assert not out.exists()
    # What a crash in the middle of writing shard 5 leaves: a temporary file and, at worst, a
    # partial part without its record. Neither may leak into the result.
    (parts / ".part-00005.parquet.123.tmp").write_bytes(b"PAR1 partial")
    (parts / "part-00005.parquet").write_bytes(b"PAR1 partial")

    assert run_cli(score_args(work, out)) == 0
    assert pq.read_table(out).equals(pq.read_table(baseline))
    manifest = json.loads(out.with_suffix(".manifest.json").read_text())
    assert manifest["last_run"]["shards_skipped"] == 3 and manifest["last_run"]["shards_done_now"] == 4
    assert [e["id"] for e in manifest["errors"]] == [CORRUPT_ID]

    # A rerun of a finished run redoes nothing and rewrites the same file.
    assert run_cli(score_args(work, out)) == 0
    manifest = json.loads(out.with_suffix(".manifest.json").read_text())
    assert manifest["last_run"]["shards_done_now"] == 0
    assert pq.read_table(out).equals(pq.read_table(baseline))


def test_changed_arguments_are_refused(work, baseline, capsys):
    capsys.readouterr()
    assert run_cli(score_args(work, baseline, extra=("--c", "1"))) == 2  # the last --c wins
    err = capsys.readouterr().err
    assert "different arguments" in err and "--c: 2 before, 1 now" in err

    templates = work.root / "templates.txt"
    templates.write_text("a blurry photo of a {}.\n")
    argv = score_args(work, baseline)
    argv[argv.index("--templates") + 1] = str(templates)
    assert run_cli(argv) == 2
    assert "the prompt templates (--templates) changed" in capsys.readouterr().err

    # New images under the folder change the shard layout: refused too.
    grown = work.root / "grown"
    make_image_folder(grown, 9)
    out = work.root / "grown_out" / "scores.parquet"
    assert run_cli(score_args(work, out, source=["--images", str(grown)])) == 0
    make_image_folder(grown / "more", 1, seed=5)
    assert run_cli(score_args(work, out, source=["--images", str(grown)])) == 2
    assert "the images of --images changed" in capsys.readouterr().err


def test_torchrun_two_ranks_gives_the_same_rows(work, baseline):
    out = work.root / "torchrun" / "scores.parquet"
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "deltakern.cli", *score_args(work, out),
    ]  # fmt: skip
    proc = run_subprocess(argv, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, multi = pq.read_table(baseline), pq.read_table(out)
    assert multi.num_rows == 50
    for name in ("id", "source", "pred", "pred_name", "topk_indices"):
        assert multi.column(name).to_pylist() == single.column(name).to_pylist(), name
    for name in FLOAT_COLUMNS:
        assert_close_contract(
            torch.tensor(multi.column(name).to_pylist()), torch.tensor(single.column(name).to_pylist()), torch.float32, name
        )
    manifest = json.loads(out.with_suffix(".manifest.json").read_text())
    assert manifest["last_run"]["world_size"] == 2 and manifest["last_run"]["shards_done_now"] == 7
    assert [e["id"] for e in manifest["errors"]] == [CORRUPT_ID]
    # each rank wrote the shards i % 2 == rank; rank 0 merged them all
    assert sorted(p["index"] for p in manifest["parts"]) == list(range(7))


def test_torchrun_two_ranks_encode_the_same_features(work):
    """encode under torchrun: each rank writes its shards, rank 0 the manifest; the features
    equal a single process's and a rerun with the other world size resumes nothing."""
    single_dir, multi_dir = work.root / "enc-single", work.root / "enc-multi"
    encode = ["encode", *common(work), "--images", str(work.images), "--dtype", "float32"]
    assert run_cli([*encode, "--out", str(single_dir)]) == 0
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "deltakern.cli", *encode, "--out", str(multi_dir),
    ]  # fmt: skip
    proc = run_subprocess(argv, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((multi_dir / "manifest.json").read_text())
    assert manifest["last_run"]["world_size"] == 2 and manifest["count"] == 50
    X1, ids1 = feature_matrix(single_dir)
    X2, ids2 = feature_matrix(multi_dir)
    assert ids1 == ids2
    assert_close_contract(X2, X1, torch.float32, "features")
    assert run_cli([*encode, "--out", str(multi_dir)]) == 0  # finished: one process redoes nothing
    assert json.loads((multi_dir / "manifest.json").read_text())["last_run"]["shards_done_now"] == 0


def test_webdataset_shards_give_the_same_rows_as_the_folder(work, baseline):
    all_ids = sorted([*work.ids, CORRUPT_ID])
    pattern = make_tar_shards(work.images, work.root / "tars", all_ids, per_tar=SHARD)
    out = work.root / "wds" / "scores.parquet"
    assert run_cli(score_args(work, out, source=["--images", pattern])) == 0
    folder, wds = pq.read_table(baseline), pq.read_table(out)
    assert wds.drop_columns(["source"]).equals(folder.drop_columns(["source"]))
    assert set(wds.column("source").to_pylist()) == {str(p) for p in sorted((work.root / "tars").glob("*.tar"))}
    manifest = json.loads(out.with_suffix(".manifest.json").read_text())
    assert [e["id"] for e in manifest["errors"]] == [CORRUPT_ID] and len(manifest["parts"]) == 7


def test_file_lists_and_compressed_tars(work, tmp_path):
    # A text list (relative to the list's folder) and a CSV with ids name the same images.
    (work.images / "list.txt").write_text("# two images\na/img001.jpg\n\nb/c/img000.png\n")
    items = data.open_source(str(work.images / "list.txt")).plan(SHARD)[0].list_items()
    assert [i.id for i in items] == ["a/img001.jpg", "b/c/img000.png"]
    assert [i.source for i in items] == [str(work.images / "a/img001.jpg"), str(work.images / "b/c/img000.png")]
    csv_path = tmp_path / "list.csv"
    csv_path.write_text(f"id,path\nfirst,{work.images / 'a/img001.jpg'}\n")
    (item,) = data.open_source(str(csv_path)).plan(SHARD)[0].list_items()
    assert item.id == "first" and data.read_image_bytes(item) == (work.images / "a/img001.jpg").read_bytes()
    # Members of a gzipped tar read back byte for byte, like those of a plain tar.
    import tarfile

    gz = tmp_path / "x.tar.gz"
    with tarfile.open(gz, "w:gz") as tar:
        for rel in work.ids[:3]:
            tar.add(work.images / rel, arcname=rel)
    members = data.index_tar(str(gz))
    assert [m.id for m in members] == work.ids[:3]
    assert [data.read_image_bytes(m) for m in members] == [(work.images / r).read_bytes() for r in work.ids[:3]]
    # Shards: fixed runs of shard_size images; batches never span two shards.
    plan = data.open_source(str(work.images)).plan(SHARD)
    assert [len(s.list_items()) for s in plan] == [8] * 6 + [3]
    assert data.shard_batches([3, 5], 2) == [[0, 1], [2], [3, 4], [5, 6], [7]]


def test_prompts_checkpoint_option(work, monkeypatch, capsys):
    feats = work.root / "features32"  # written by the first test in this file
    if not (feats / "manifest.json").is_file():
        assert run_cli(["encode", *common(work), "--images", str(work.images), "--dtype", "float32", "--out", str(feats)]) == 0
    ckpt = work.root / "prompts.pt"
    ckpt.write_bytes(b"checkpoint")
    out = work.root / "prompts" / "scores.parquet"
    argv = score_args(work, out, source=["--features", str(feats)], extra=("--prompts", str(ckpt)))
    argv.remove("--classes"), argv.remove(str(work.classes))

    # A checkpoint file that is not there: one clear line naming the flag, before any work.
    missing = [a if a != str(ckpt) else str(work.root / "missing.pt") for a in argv]
    capsys.readouterr()
    assert run_cli(missing) == 2
    assert "argument --prompts: prompts must be a prompt-tuning checkpoint file" in capsys.readouterr().err

    # Stand in for the prompt checkpoint reader (its own tests cover it against a real checkpoint).
    from deltakern.pipeline import classes as pipeline_classes

    W = torch.nn.functional.normalize(torch.randn(3, 64, generator=torch.Generator().manual_seed(1)), dim=1)
    calls = []

    def from_checkpoint(path, model, tokenizer, device):
        calls.append((path, device))
        return W.to(device)

    monkeypatch.setattr(pipeline_classes, "class_embeddings_from_checkpoint", from_checkpoint)
    monkeypatch.setattr(pipeline_classes, "load_checkpoint", lambda path: {"classnames": ["x", "y", "z"]})
    assert run_cli(argv) == 0
    assert calls == [(str(ckpt), torch.device("cpu"))]
    table = pq.read_table(out)
    X, _ = feature_matrix(feats)
    assert table.column("pred_name").to_pylist() == ["xyz"[k] for k in table.column("pred").to_pylist()]
    expected = dk.score(X, W, c=2)
    assert_close_contract(torch.tensor(table.column("delta_energy").to_pylist()), expected.delta_energy, torch.float32)


def test_bad_arguments(work, tmp_path, capsys):
    assert run_cli(score_args(work, tmp_path / "scores.csv")) == 2
    assert "out must be a path ending in .parquet" in capsys.readouterr().err
    assert run_cli(score_args(work, tmp_path / "a.parquet", extra=("--c", "0"))) == 2
    assert "c must satisfy" in capsys.readouterr().err
    assert run_cli(score_args(work, tmp_path / "b.parquet", extra=("--c", "8"))) == 2  # K = 7
    assert "c must satisfy 1 <= c <= 7, got 8" in capsys.readouterr().err
    assert run_cli(score_args(work, tmp_path / "c.parquet", source=["--images", str(tmp_path / "nope")])) == 2
    assert "images must be an existing folder" in capsys.readouterr().err
    assert run_cli(score_args(work, tmp_path / "d.parquet", extra=("--temperature", "0"))) == 2
    assert "temperature must be a finite number > 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="pretrained must be a local checkpoint file, 'none' or one of the tags"):
        load_model("ViT-B-32", "no-such-tag")
    with pytest.raises(ValueError, match="model must be an open_clip architecture"):
        load_model("ViT-Z-99", "none")


# -- decode workers and torch threads, JPEG draft, GPU decoding ---------------------------------------

from deltakern.pipeline import parallelism  # noqa: E402


@pytest.mark.parametrize(
    "cores, device, expected",
    [
        (1, "cpu", (1, 1)), (2, "cpu", (1, 2)), (4, "cpu", (1, 4)), (7, "cpu", (1, 7)), (8, "cpu", (2, 8)),
        (16, "cpu", (4, 16)), (64, "cpu", (8, 64)), (96, "cpu", (8, 96)),
        (1, "cuda", (1, None)), (2, "cuda", (2, None)), (16, "cuda", (8, None)),
    ],
)  # fmt: skip
def test_workers_and_threads_rule(cores, device, expected):
    chosen = parallelism.choose_parallelism(cores, device)
    assert (chosen.workers, chosen.torch_threads) == expected
    assert chosen.rule == f"{'cpu' if device == 'cpu' else 'gpu'}-auto"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("workers", [0, 3, 12])
def test_explicit_workers_win(device, workers):
    chosen = parallelism.choose_parallelism(2, device, workers)
    assert chosen == parallelism.Parallelism(workers, None, "explicit")
    with pytest.raises(ValueError, match="workers"):
        parallelism.choose_parallelism(2, device, -1)
    with pytest.raises(ValueError, match="cores"):
        parallelism.choose_parallelism(0, device)


def without_workers_flag(argv: list[str]) -> list[str]:
    i = argv.index("--workers")
    return argv[:i] + argv[i + 2 :]


def test_default_workers_and_threads_are_applied_and_recorded(work, tmp_path):
    before = torch.get_num_threads()
    loaders, thread_calls = [], []
    real_loader, real_set = torch.utils.data.DataLoader, torch.set_num_threads

    def loader(*args, **kwargs):
        loaders.append(kwargs["num_workers"])
        return real_loader(*args, **kwargs)

    def set_threads(n):
        thread_calls.append(n)
        real_set(n)

    out = tmp_path / "auto" / "scores.parquet"
    with mock.patch("deltakern.pipeline.score.available_cores", return_value=8), \
            mock.patch("torch.utils.data.DataLoader", loader), mock.patch("torch.set_num_threads", set_threads):  # fmt: skip
        assert run_cli(without_workers_flag(score_args(work, out))) == 0
    # 8 cores on a CPU run: 2 decode workers, torch on all 8 cores while streaming, then restored.
    assert loaders == [2] and thread_calls == [8, before] and torch.get_num_threads() == before
    manifest = json.loads(out.with_suffix(".manifest.json").read_text())
    assert manifest["parallelism"] == {"workers": 2, "torch_threads": 8, "rule": "cpu-auto"}

    loaders.clear(), thread_calls.clear()
    out = tmp_path / "explicit" / "scores.parquet"
    with mock.patch("deltakern.pipeline.score.available_cores", return_value=8), \
            mock.patch("torch.utils.data.DataLoader", loader), mock.patch("torch.set_num_threads", set_threads):  # fmt: skip
        assert run_cli(score_args(work, out, workers=0)) == 0
    assert loaders == [0] and thread_calls == []  # as given; torch's threads left alone
    manifest = json.loads(out.with_suffix(".manifest.json").read_text())
    assert manifest["parallelism"] == {"workers": 0, "torch_threads": before, "rule": "explicit"}
    # The run's identity does not include them: a rerun with other workers resumes.
    assert run_cli(without_workers_flag(score_args(work, out))) == 0


@pytest.mark.parametrize("command", ["encode", "score"])
def test_model_commands_keep_freed_memory_before_running(work, tmp_path, command):
    """The commands that run the encoder keep freed heap memory (deltakern.runtime.heap), and do
    so before the run starts, so that its DataLoader workers inherit the setting too."""
    calls: list[str] = []
    real_run = getattr(pipeline, f"run_{command}")

    def run(*args, **kwargs):
        calls.append("run")
        return real_run(*args, **kwargs)

    out = tmp_path / ("scores.parquet" if command == "score" else "features")
    argv = score_args(work, out) if command == "score" else ["encode", *common(work), "--images", str(work.images), "--out", str(out)]
    with mock.patch("deltakern.runtime.heap.keep_freed_memory", side_effect=lambda: calls.append("heap") or True), \
            mock.patch(f"deltakern.pipeline.run_{command}", run):  # fmt: skip
        assert run_cli(argv) == 0
    assert calls == ["heap", "run"]


@pytest.fixture(scope="module")
def large_jpegs(tmp_path_factory):
    """JPEGs at least twice the tiny model's 32-pixel input (so the draft reduces them) and a PNG."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("large")
    rng = np.random.default_rng(3)
    for i in range(6):
        pixels = rng.integers(0, 256, size=(150 + 10 * i, 200, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img{i}.{'png' if i == 5 else 'jpg'}", quality=90)
    return root


def test_jpeg_draft_default_identity_and_opt_out(work, large_jpegs, tmp_path, capsys):
    calls = []
    real = data.request_jpeg_draft

    def spy(img, min_side):
        fmt, reduced = img.format, real(img, min_side)
        calls.append((fmt, min_side, reduced))
        return reduced

    def run(out, *extra):
        argv = score_args(work, out, source=["--images", str(large_jpegs)], extra=extra)
        with mock.patch.object(data, "request_jpeg_draft", spy):
            return run_cli(argv)

    on = tmp_path / "on" / "scores.parquet"
    assert run(on) == 0
    # Asked with the model's input side; every JPEG reduced, the PNG left alone.
    assert calls == [("JPEG", 32, True)] * 5 + [("PNG", 32, False)]
    manifest = json.loads(on.with_suffix(".manifest.json").read_text())
    assert manifest["args"]["jpeg_draft"] is True and "jpeg_draft" in manifest["preprocessing"]
    calls.clear()
    off = tmp_path / "off" / "scores.parquet"
    assert run(off, "--no-jpeg-draft") == 0
    assert calls == []
    manifest = json.loads(off.with_suffix(".manifest.json").read_text())
    assert "jpeg_draft" not in manifest["args"] and "jpeg_draft" not in manifest["preprocessing"]
    # The draft changes pixels, so the embeddings move a little, and a run cannot switch halfway.
    rows_on, rows_off = pq.read_table(on).to_pydict(), pq.read_table(off).to_pydict()
    assert rows_on["id"] == rows_off["id"] and rows_on["energy"] != rows_off["energy"]
    capsys.readouterr()
    assert run(on, "--no-jpeg-draft") == 2 and "jpeg" in capsys.readouterr().err.lower()
    assert run(off) == 2 and "jpeg" in capsys.readouterr().err.lower()


def test_gpu_decode_needs_cuda(work, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without CUDA")
    capsys.readouterr()
    assert run_cli(score_args(work, tmp_path / "g.parquet", extra=("--gpu-decode",))) == 2
    err = capsys.readouterr().err
    assert "--gpu-decode" in err and "CUDA" in err


def embed(clip, work, **kwargs):
    from deltakern.pipeline.engine import embed_shards
    from deltakern.runtime import make_runtime

    shards = data.open_source(str(work.images)).plan(SHARD)
    got = list(embed_shards(clip, shards, make_runtime("cpu"), batch_size=5, workers=0, progress=False, **kwargs))
    return torch.cat([g.embeddings for g in got]), [i for g in got for i in g.ids], [e for g in got for e in g.errors]


def test_device_decoding_path_gives_the_cpu_path_embeddings(work):
    # The gpu_decode path run on the CPU (torchvision's CPU JPEG decoder): the same images, ids
    # and failures as the worker path, embeddings equal up to libjpeg's rounding.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_model(TINY_MODEL, "none")
    with torch.inference_mode():
        X_cpu, ids_cpu, errors_cpu = embed(clip, work)
        X_dev, ids_dev, errors_dev = embed(clip, work, gpu_decode=True)
    assert ids_dev == ids_cpu == work.ids and errors_dev == errors_cpu
    cos = torch.nn.functional.cosine_similarity(X_dev, X_cpu, dim=1)
    assert cos.min() > 0.999, cos.min()


def test_the_one_pass_transform_runs_and_changes_no_embedding(work, monkeypatch):
    # deltakern.clip.preprocess: the workers' transform is the one-pass op when it reproduces the
    # model's transform; the embeddings are the same bits as with the model's own transform.
    from deltakern.clip import preprocess
    from deltakern.ops import registry

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_model(TINY_MODEL, "none")
    assert isinstance(preprocess.one_pass_transform(clip.preprocess), preprocess.OnePassTransform)
    calls = []
    op = registry.resample_crop_normalize
    monkeypatch.setattr(registry, "resample_crop_normalize", lambda *a, **k: calls.append(1) or op(*a, **k))
    with torch.inference_mode():
        X_fast, ids_fast, errors_fast = embed(clip, work)
        used = len(calls)
        monkeypatch.setenv(preprocess.ONE_PASS_ENV, "0")
        X_model, ids_model, errors_model = embed(clip, work)
    assert used >= len(work.ids) - len(errors_fast) and len(calls) == used
    assert ids_fast == ids_model and errors_fast == errors_model
    assert torch.equal(X_fast, X_model)
