"""Runs of ``deltakern score`` / ``encode`` as a careless caller, a crash or a full disk meet them:
reproducible manifests, checks before the model loads, one plain random-weights warning, a
fast offline error, truthful summaries, no leftovers after a kill, one run per output, write
failures named and resumable; and the options a run records (--mode, --reset, --c, --dtype,
--precision, --pretrained FILE, --imagenet) checked against independent computations.

Offline and on CPU: the tiny registered open_clip model (``deltakern-tiny``).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch

pytest.importorskip("open_clip")
pq = pytest.importorskip("pyarrow.parquet")

import deltakern as dk  # noqa: E402
from deltakern import cli  # noqa: E402
from deltakern.clip import models, zeroshot  # noqa: E402
from deltakern.clip.models import TINY_MODEL, load_model  # noqa: E402
from deltakern.data.features import read_feature_shard  # noqa: E402
from deltakern.data.rundir import RunDir  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _images import CORRUPT_ID, make_bad_files, make_image_folder  # noqa: E402
from oracle import assert_close_contract, assert_indices_match, scores64  # noqa: E402

CLASSES = ["cat", "dog", "bird", "fish", "car", "tree", "boat"]
REPO = Path(__file__).resolve().parent.parent
CRASH = [sys.executable, str(REPO / "tests" / "_crash.py")]
FLOAT_COLUMNS = ("delta_energy", "energy", "msp", "max_logit")
N_GOOD = 30
N_BAD = 4  # the corrupt JPEG of make_image_folder and the three files of make_bad_files
N_SHARDS = 5  # ceil(34 / 8)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    images = root / "images"
    ids = make_image_folder(images, N_GOOD)
    bad = make_bad_files(images / "bad")
    classes = root / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    return types.SimpleNamespace(root=root, images=images, ids=ids, bad=bad, classes=classes, cache=root / "cache")


def common(*, workers: int = 0) -> list[str]:
    return [
        "--model", TINY_MODEL, "--pretrained", "none", "--shard-size", "8", "--batch-size", "5",
        "--workers", str(workers), "--device", "cpu", "--no-progress",
        # float32 like the oracles these runs are checked against ("auto" is bf16 autocast on CPUs
        # with native bf16; test_runs.py checks that the precision reaches the encoder)
        "--precision", "fp32",
    ]  # fmt: skip


def score_args(work, out: Path, *extra: str, source: list[str] | None = None) -> list[str]:
    return [
        "score", *common(), *(source or ["--images", str(work.images)]), "--classes", str(work.classes),
        "--templates", "single", "--c", "2", "--cache-dir", str(work.cache), "--out", str(out), *extra,
    ]  # fmt: skip


def encode_args(work, out: Path, *extra: str) -> list[str]:
    return ["encode", *common(), "--images", str(work.images), "--out", str(out), *extra]


def run_cli(argv: list[str]) -> int:
    """``deltakern ARGV`` in this process, with only the commands under test registered."""
    with warnings.catch_warnings(), mock.patch.dict(cli.COMMANDS, {"encode": "encode", "score": "score"}, clear=True):
        warnings.simplefilter("ignore")  # the random-weights warning
        return cli.main(argv)


def run_subprocess(argv: list[str], env_extra: dict | None = None, timeout: int = 150) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def manifest_of(out: Path) -> dict:
    return json.loads(out.with_suffix(".manifest.json").read_text())


def temporaries(*dirs: Path) -> list[str]:
    return sorted(p.name for d in dirs if d.is_dir() for p in d.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def baseline(work):
    out = work.root / "baseline" / "scores.parquet"
    assert run_cli(score_args(work, out)) == 0
    return out


@pytest.fixture(scope="module")
def features32(work):
    out = work.root / "features32"
    assert run_cli(encode_args(work, out, "--dtype", "float32")) == 0
    return out


def feature_matrix(directory: Path) -> tuple[torch.Tensor, list[str]]:
    manifest = json.loads((directory / "manifest.json").read_text())
    parts = [read_feature_shard(directory / s["file"]) for s in manifest["shards"]]
    return torch.cat([p[0] for p in parts]), [i for p in parts for i in p[1]]


def class_matrix(names, seed: int = 0) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_model(TINY_MODEL, "none", seed=seed)
    return zeroshot.build_class_embeddings(clip.model, clip.tokenizer, list(names), zeroshot.template_preset("single"))


def without_timing(manifest: dict) -> dict:
    """A manifest without the fields that are explicitly timing (``timing``, ``*_s`` of last_run)."""
    m = {k: v for k, v in manifest.items() if k != "timing"}
    m["last_run"] = {k: v for k, v in manifest["last_run"].items() if not k.endswith("_s")}
    return m


# -- item 6 (and the manifest part of item 5) -------------------------------------------------------


def test_identical_runs_write_identical_manifests(work, baseline):
    again = work.root / "again" / "scores.parquet"
    assert run_cli(score_args(work, again)) == 0
    first, second = manifest_of(baseline), manifest_of(again)
    assert without_timing(first) == without_timing(second)
    assert pq.read_table(again).equals(pq.read_table(baseline))
    reasons = {e["id"]: e["error"] for e in first["errors"]}
    assert set(reasons) == {CORRUPT_ID, *(f"bad/{name}" for name in work.bad)}
    for name, start in work.bad.items():
        assert reasons[f"bad/{name}"].startswith(start), reasons
    assert reasons[CORRUPT_ID].startswith(("truncated JPEG: ", "corrupt JPEG: "))
    assert "0x" not in json.dumps(first)
    assert first["preprocessing"]["exif_transpose"] is True and first["args"]["exif_transpose"] is True
    assert first["rows"] == N_GOOD and first["images"] == N_GOOD + N_BAD


# -- item 7 ------------------------------------------------------------------------------------------


def test_everything_checkable_fails_before_the_model_loads(work, baseline, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty.txt"
    empty.write_text("# no classes here\n\n")
    garbage = tmp_path / "prompts.pt"
    garbage.write_bytes(b"not a checkpoint")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")

    def swap(argv, flag, value):
        argv = list(argv)
        argv[argv.index(flag) + 1] = value
        return argv

    def no_classes(argv):
        i = argv.index("--classes")
        return argv[:i] + argv[i + 2 :]

    out = tmp_path / "s.parquet"
    cases = [
        (swap(score_args(work, out), "--classes", str(tmp_path / "missing.txt")), "argument --classes: classes must be a text file"),
        (swap(score_args(work, out), "--classes", str(empty)), "argument --classes: classes file"),
        (score_args(work, out, "--c", "8"), "argument --c: c must satisfy 1 <= c <= 7, got 8"),
        (swap(score_args(work, out), "--templates", str(tmp_path / "none.txt")), "argument --templates: templates must be"),
        (no_classes(score_args(work, out, "--prompts", str(garbage))), "argument --prompts: prompts: cannot read"),
        (score_args(work, a_file / "s.parquet"), "cannot write"),
        (score_args(work, baseline, "--mode", "joint"), "--mode: 'separate' before, 'joint' now"),
        (score_args(work, baseline, "--reset", "0.25"), "--reset: 0.0 before, 0.25 now"),
        (encode_args(work, a_file / "feats"), "cannot write"),
        (swap(encode_args(work, tmp_path / "f"), "--pretrained", "no-such-tag"), "argument --pretrained: pretrained must be"),
    ]
    loaded = []
    real_load = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loaded.append(a) or real_load(*a, **k))
    capsys.readouterr()
    for argv, message in cases:
        assert run_cli(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (message, err)
        assert err.count("\n") == 1, err  # one line, no traceback
        assert loaded == [], f"the model was loaded before refusing {argv}"


def test_random_weights_warning_is_printed_once_plainly(work, tmp_path):
    out = tmp_path / "s.parquet"
    proc = run_subprocess([sys.executable, "-m", "deltakern.cli", *score_args(work, out)])
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    warned = [line for line in lines if "random weights" in line]
    assert len(warned) == 1, proc.stderr
    assert warned[0].startswith("deltakern score: warning: pretrained='none': model 'deltakern-tiny' has random weights")
    assert "warnings.warn" not in proc.stderr and ".py:" not in proc.stderr, proc.stderr
    assert "No pretrained weights loaded" not in proc.stderr
    assert lines == warned, proc.stderr  # and nothing else on stderr


# -- item 8 ------------------------------------------------------------------------------------------


def test_missing_weights_offline_is_one_fast_clear_error(monkeypatch):
    import huggingface_hub
    import open_clip.pretrained
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import _http

    online, sleeps = [], []

    def download(*args, **kwargs):  # no network: nothing cached, every request refused
        if constants.HF_HUB_OFFLINE or kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not in the local cache")
        online.append(kwargs.get("filename"))
        raise ConnectionError("[Errno 111] Connection refused")

    class Offline:
        def head(self, *args, **kwargs):
            online.append("probe")
            raise ConnectionError("[Errno 111] Connection refused")

    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "get_session", lambda: Offline())
    monkeypatch.setattr(_http.time, "sleep", lambda s: sleeps.append(s))
    with pytest.raises(ValueError, match="not in the local cache and cannot be downloaded") as info:
        load_model("ViT-B-32", "openai")
    message = str(info.value)
    assert "local checkpoint file" in message and "'none'" in message and "Connection refused" in message
    assert info.value.param == "pretrained"
    assert online == ["probe"] and sleeps == []  # one request, no download attempts, no backoff


def test_missing_weights_offline_from_the_command_line(work, tmp_path):
    # A real refused connection (no network) and an empty cache, end to end.
    argv = score_args(work, tmp_path / "s.parquet")
    argv[argv.index("--model") + 1], argv[argv.index("--pretrained") + 1] = "ViT-B-32", "openai"
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "hub"), "XDG_CACHE_HOME": str(tmp_path)}
    t0 = time.perf_counter()
    proc = run_subprocess([sys.executable, "-m", "deltakern.cli", *argv], env_extra=env, timeout=120)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("deltakern score: error: argument --pretrained: "), proc.stderr
    assert "Retry" not in proc.stderr and "Traceback" not in proc.stderr
    print(f"offline --pretrained openai failed in {elapsed:.1f} s (process start included)")


# -- item 9 ------------------------------------------------------------------------------------------


def test_summary_tells_the_output_totals(work, baseline, features32, tmp_path, capsys):
    out = tmp_path / "resumed" / "scores.parquet"
    proc = run_subprocess([*CRASH, "2", *score_args(work, out)])
    assert proc.returncode == 75, proc.stderr
    capsys.readouterr()
    assert run_cli(score_args(work, out)) == 0
    line = capsys.readouterr().out.strip()
    totals = f"{N_GOOD} rows from {N_GOOD + N_BAD} images ({N_BAD} failed to decode)"
    assert line.startswith(f"{totals}; this run added "), line
    assert f"in {N_SHARDS - 2} shards (2 were already done)" in line
    m = manifest_of(out)
    added = m["last_run"]
    assert f"this run added {added['rows']} rows from {added['images']} images" in line
    assert added["rows"] < N_GOOD
    assert pq.read_table(out).equals(pq.read_table(baseline))

    assert run_cli(score_args(work, out)) == 0
    assert capsys.readouterr().out.strip().startswith(f"already complete: {totals}; nothing left to do")

    # Scored from features, the images that failed to encode are counted.
    from_features = tmp_path / "from_features" / "scores.parquet"
    assert run_cli(score_args(work, from_features, source=["--features", str(features32)])) == 0
    assert capsys.readouterr().out.strip().startswith(f"{totals} in ")
    assert manifest_of(from_features)["images"] == N_GOOD + N_BAD


# -- item 10 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["merge:2", "replace:part-00002.json", "replace:scores.manifest.json"])
def test_rerun_removes_temporaries_of_a_killed_run(work, baseline, tmp_path, fault):
    out = tmp_path / "killed" / "scores.parquet"
    proc = run_subprocess([*CRASH, fault, *score_args(work, out)])
    assert proc.returncode == 75, proc.stderr
    left = temporaries(out.parent, out.with_suffix(".parts"))
    assert left, "the kill should have left a temporary file"
    assert run_cli(score_args(work, out)) == 0
    assert temporaries(out.parent, out.with_suffix(".parts")) == []
    assert pq.read_table(out).equals(pq.read_table(baseline))
    assert without_timing(manifest_of(out))["errors"] == manifest_of(baseline)["errors"]


# -- item 11 -----------------------------------------------------------------------------------------


def test_two_runs_on_one_output_are_refused(work, tmp_path, capsys):
    out = tmp_path / "busy" / "scores.parquet"
    with RunDir(out.with_suffix(".parts"), "part", ".parquet").lock("a test"):
        capsys.readouterr()
        assert run_cli(score_args(work, out)) == 2
        err = capsys.readouterr().err
        assert f"argument --out: the score run for {out} is already running (process {os.getpid()} holds" in err
        assert not out.exists() and not list(out.with_suffix(".parts").glob("part-*"))
    feats = tmp_path / "feats"
    with RunDir(feats, "features", ".safetensors").lock("a test"):
        assert run_cli(encode_args(work, feats)) == 2
        assert "is already running" in capsys.readouterr().err


def test_a_killed_run_does_not_leave_the_output_locked(work, tmp_path, capsys):
    out = tmp_path / "killed_holder" / "scores.parquet"
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time; from deltakern.data.rundir import RunDir\n"
            f"with RunDir({str(out.with_suffix('.parts'))!r}, 'part', '.parquet').lock('x'):\n"
            "    print('locked', flush=True); time.sleep(300)"
        )],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert run_cli(score_args(work, out)) == 2
        assert f"(process {holder.pid} holds" in capsys.readouterr().err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert run_cli(score_args(work, out)) == 0


# -- item 12 -----------------------------------------------------------------------------------------


def _failing_replace(name_pattern: str, exc: OSError):
    """``os.replace`` that raises ``exc`` when renaming onto a file whose name matches."""
    import fnmatch

    real = os.replace

    def wrapper(*args, **kwargs):
        if fnmatch.fnmatch(os.path.basename(os.fspath(args[1])), name_pattern):
            raise exc
        return real(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize(
    "where, target, exc",
    [
        ("replace", "part-00003.parquet", OSError(errno.ENOSPC, "No space left on device")),
        ("replace", "part-00001.json", OSError(errno.EACCES, "Permission denied")),
        ("replace", "scores.manifest.json", OSError(errno.EROFS, "Read-only file system")),
        # pyarrow keeps only the message of the failed write, not the errno
        ("merge", "scores.parquet", OSError("IOError: [Errno 28] Error writing bytes to file. Detail: No space left on device")),
    ],
)
def test_a_failed_write_is_named_and_the_rerun_resumes(work, baseline, tmp_path, capsys, monkeypatch, where, target, exc):
    import pyarrow.parquet as pq_module

    out = tmp_path / "full" / "scores.parquet"
    with monkeypatch.context() as patch:
        if where == "replace":
            patch.setattr(os, "replace", _failing_replace(target, exc))
        else:
            real = pq_module.ParquetWriter.write_table

            def write_table(self, table, *args, **kwargs):
                if os.path.basename(str(getattr(self, "where", ""))).startswith(f".{target}."):
                    raise exc
                return real(self, table, *args, **kwargs)

            patch.setattr(pq_module.ParquetWriter, "write_table", write_table)
        capsys.readouterr()
        assert run_cli(score_args(work, out)) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deltakern score: error: cannot write "), err
    assert target in lines[0] and "rerun" in lines[0]
    final = out.with_suffix(".manifest.json") if target.endswith("manifest.json") else out
    assert not final.exists() and not (out.with_suffix(".parts") / target).exists()
    assert temporaries(out.parent, out.with_suffix(".parts")) == []
    capsys.readouterr()
    assert run_cli(score_args(work, out)) == 0  # space freed: the rerun resumes
    assert pq.read_table(out).equals(pq.read_table(baseline))
    resumed = manifest_of(out)["last_run"]
    assert resumed["shards_done_now"] + resumed["shards_skipped"] == N_SHARDS
    if target.startswith("part-0000"):
        assert resumed["shards_skipped"] == int(target[5:10])  # the shards before the failure were kept


# -- item 15: options that must reach the computation ------------------------------------------------


def test_mode_reset_c_temperature_reach_the_scores(work, features32, tmp_path):
    X, ids = feature_matrix(features32)
    W = class_matrix(CLASSES)
    for mode, reset, c, temperature in (("joint", 0.3, 3, 0.02), ("separate", -0.2, 4, 0.01)):
        out = tmp_path / f"{mode}" / "scores.parquet"
        argv = score_args(work, out, "--mode", mode, "--reset", str(reset), "--c", str(c), "--temperature", str(temperature),
                          source=["--features", str(features32)])  # fmt: skip
        assert run_cli(argv) == 0
        rows = pq.read_table(out).to_pydict()
        assert rows["id"] == ids
        expected = scores64(X, W, temperature=temperature, c=c, reset=reset, mode=mode)
        for name in FLOAT_COLUMNS:
            assert_close_contract(torch.tensor(rows[name]), expected[name], torch.float32, f"{mode} {name}")
        assert_indices_match(torch.tensor(rows["topk_indices"]), expected["topk_indices"], expected["logits"], torch.float32)
        args = manifest_of(out)["args"]
        assert (args["mode"], args["reset"], args["c"], args["temperature"]) == (mode, reset, c, temperature)


def test_matmul_precision_reaches_the_scores_and_names_the_run(work, features32, tmp_path, capsys, monkeypatch):
    """--matmul-precision medium with the bfloat16 GEMM forced: other scores than the default
    run's, named in the run's arguments (a resume with another setting is refused); the
    default leaves the arguments as they were before the setting existed."""
    if "cpp" not in dk.available_backends("cpu"):
        pytest.skip("needs the compiled CPU op")
    monkeypatch.setenv("DELTAKERN_CPU_HALF_GEMM", "mkl")
    rows = {}
    for precision in ("highest", "medium"):
        out = tmp_path / precision / "scores.parquet"
        argv = score_args(work, out, "--backend", "cpp", "--matmul-precision", precision,
                          source=["--features", str(features32)])  # fmt: skip
        assert run_cli(argv) == 0
        rows[precision] = pq.read_table(out).to_pydict()
        args = manifest_of(out)["args"]
        assert args.get("matmul_precision") == (None if precision == "highest" else precision)
    assert rows["highest"]["energy"] != rows["medium"]["energy"]
    capsys.readouterr()
    argv = score_args(work, tmp_path / "medium" / "scores.parquet", "--backend", "cpp", source=["--features", str(features32)])
    assert run_cli(argv) == 2
    assert "matmul_precision" in capsys.readouterr().err


def test_encode_resumes_and_refuses_other_arguments(work, features32, tmp_path, capsys):
    out = tmp_path / "enc"
    proc = run_subprocess([*CRASH, "2", *encode_args(work, out, "--dtype", "float32")])
    assert proc.returncode == 75, proc.stderr
    assert sorted(p.name for p in out.glob("features-*.json")) == ["features-00000.json", "features-00001.json"]
    capsys.readouterr()
    assert run_cli(encode_args(work, out, "--dtype", "float32")) == 0
    assert "(2 were already done)" in capsys.readouterr().out
    X, ids = feature_matrix(out)
    X_ref, ids_ref = feature_matrix(features32)
    assert ids == ids_ref and torch.equal(X, X_ref)
    manifest, ref = (json.loads((d / "manifest.json").read_text()) for d in (out, features32))
    assert without_timing(manifest)["errors"] == ref["errors"] and manifest["count"] == N_GOOD

    for flag, value, message in (
        ("--dtype", "float16", "--dtype: 'float32' before, 'float16' now"),
        ("--precision", "bf16", "--precision: 'fp32' before, 'bf16' now"),
        ("--seed", "1", "--seed: 0 before, 1 now"),
    ):
        argv = encode_args(work, out, "--dtype", "float32")
        argv += [flag, value]
        assert run_cli(argv) == 2
        assert message in capsys.readouterr().err
    assert run_cli(encode_args(work, out, "--dtype", "float32")) == 0
    assert capsys.readouterr().out.startswith(f"already complete: {N_GOOD} rows")


def test_precision_reaches_the_encoder(work, features32, tmp_path):
    out = tmp_path / "bf16"
    assert run_cli(encode_args(work, out, "--dtype", "float32", "--precision", "bf16")) == 0
    X16, ids = feature_matrix(out)
    X32, ids32 = feature_matrix(features32)
    assert ids == ids32
    assert not torch.equal(X16, X32)  # bf16 autocast changes the embeddings...
    cosine = (X16 * X32).sum(dim=1)
    assert float(cosine.min()) > 0.98  # ...by rounding only
    assert json.loads((out / "manifest.json").read_text())["args"]["precision"] == "bf16"


def test_pretrained_local_file(work, baseline, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = load_model(TINY_MODEL, "none", seed=0).model.state_dict()
    weights = tmp_path / "tiny.pt"
    torch.save(state, weights)
    out = tmp_path / "from_file" / "scores.parquet"
    argv = score_args(work, out)
    argv[argv.index("--pretrained") + 1] = str(weights)
    assert run_cli(argv) == 0
    assert pq.read_table(out).equals(pq.read_table(baseline))  # the same weights, the same rows
    manifest = manifest_of(out)
    assert manifest["args"]["pretrained"].startswith(f"file:{weights}:")
    assert manifest["model"]["pretrained"] == str(weights)

    # Other weights in that file: other scores.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(load_model(TINY_MODEL, "none", seed=1).model.state_dict(), weights)
    out2 = tmp_path / "from_other_file" / "scores.parquet"
    argv[argv.index("--out") + 1] = str(out2)
    assert run_cli(argv) == 0
    assert not pq.read_table(out2).column("delta_energy").equals(pq.read_table(baseline).column("delta_energy"))

    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not weights")
    argv[argv.index("--pretrained") + 1] = str(broken)
    argv[argv.index("--out") + 1] = str(tmp_path / "broken" / "s.parquet")
    capsys.readouterr()
    assert run_cli(argv) == 2
    assert "argument --pretrained: pretrained: cannot load" in capsys.readouterr().err


def test_imagenet_classes(work, features32, tmp_path):
    out = tmp_path / "imagenet" / "scores.parquet"
    argv = score_args(work, out, "--c", "3", source=["--features", str(features32)])
    i = argv.index("--classes")
    argv[i : i + 2] = ["--imagenet"]
    assert run_cli(argv) == 0
    names = zeroshot.imagenet_classnames()
    rows = pq.read_table(out).to_pydict()
    assert rows["pred_name"] == [names[k] for k in rows["pred"]]
    manifest = manifest_of(out)
    assert manifest["classes"]["count"] == 1000 and manifest["classes"]["names"] == list(names)
    X, _ = feature_matrix(features32)
    expected = scores64(X, class_matrix(names), c=3)
    assert_close_contract(torch.tensor(rows["delta_energy"]), expected["delta_energy"], torch.float32, "delta_energy")
    assert_indices_match(torch.tensor(rows["topk_indices"]), expected["topk_indices"], expected["logits"], torch.float32)
