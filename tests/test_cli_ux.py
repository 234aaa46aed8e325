"""Command-line points of a new user's trial run: an unknown option shows the subcommand's usage
(with the nearest option), `deltakern models` lists architectures and tags offline, an
unknown --model names the nearest architectures, and `deltakern bench` on a machine without a
GPU prints no torch.compile warnings."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from deltakern import cli

needs_open_clip = pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="open_clip is not installed")

TOP_LEVEL_USAGE = "usage: deltakern [-h] [--version] COMMAND"


def run(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse errors exit
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@needs_open_clip
@pytest.mark.parametrize(
    "argv, usage, hint",
    [
        (["filter", "s.parquet", "--threshold", "T.json", "--out", "k.parquet", "--rejeted", "r.parquet"],
         "usage: deltakern filter", "--rejeted (did you mean --rejected?)"),
        (["score", "--images", "imgs", "--out", "s.parquet", "--temprature", "0.1"],
         "usage: deltakern score", "--temprature (did you mean --temperature?)"),
        (["calibrate", "s.parquet", "--out", "T.json", "--bogus"], "usage: deltakern calibrate", None),
        (["models", "vit", "extra"], "usage: deltakern models", None),
    ],
)  # fmt: skip
def test_unknown_option_shows_the_subcommands_usage(argv, usage, hint, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2
    assert err.startswith(usage) and TOP_LEVEL_USAGE not in err
    assert "unrecognized arguments:" in err
    if hint:
        assert hint in err
    else:
        assert "did you mean" not in err


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@needs_open_clip
def test_models_lists_architectures_and_tags_offline(no_network, capsys):
    code, out, _ = run(["models"], capsys)
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(("\n", " "))}
    assert "openai" in lines["ViT-B-32"] and "laion2b_s34b_b79k" in lines["ViT-B-32"]
    assert "deltakern-tiny" in lines
    assert "architectures" in out.splitlines()[-1]
    code, out, _ = run(["models", "rn50"], capsys)
    names = [line.split()[0] for line in out.splitlines()[:-2] if line]
    assert code == 0 and names and all("rn50" in n.lower() for n in names)
    code, out, _ = run(["models", "--model", "ViT-B-32"], capsys)
    assert code == 0 and out.startswith("ViT-B-32: openai")
    code, out, _ = run(["models", "no-such-thing"], capsys)
    assert code == 1 and "try --all" in out


@needs_open_clip
def test_unknown_model_suggests_the_nearest_names(no_network, tmp_path, capsys):
    code, _, err = run(["models", "--model", "vit-b32"], capsys)
    assert code == 2 and "argument --model" in err and "nearest: ViT-B-32" in err
    # The same check runs before `deltakern score` loads anything.
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    argv = ["score", "--model", "ViT-B32", "--pretrained", "openai", "--images", str(tmp_path / "imgs"),
            "--classes", str(classes), "--out", str(tmp_path / "s.parquet"), "--device", "cpu"]  # fmt: skip
    code, _, err = run(argv, capsys)
    assert code == 2 and "argument --model" in err and "nearest: ViT-B-32" in err


# glog-style lines torch's loggers print ("W1130 11:17:38.098000 30214 path:183] ...")
TORCH_LOG_LINE = re.compile(r"^[WE]\d{4} \d\d:\d\d:\d\d")


@pytest.mark.slow  # one CPU torch.compile of a tiny graph: ~30 s on a 2-core CPU
@pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="torch.compile on CPU needs a C++ compiler")
def test_bench_compile_on_a_machine_without_gpu_prints_no_warnings(tmp_path):
    # CUDA_HOME pointing at a folder and no visible GPU is the machine of the trial run (a CUDA
    # toolkit, no CUDA runtime): torch.utils.cpp_extension, imported by inductor's CPU backend,
    # logged "No CUDA runtime is found" there. Set here so the test fails the same way anywhere.
    env = {**os.environ, "CUDA_HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    argv = [sys.executable, "-m", "deltakern.cli", "bench", "--quick", "--device", "cpu", "--suite", "score",
            "--n", "64", "--k", "10", "--d", "16", "--providers", "compile-reference", "--no-memory",
            "--out", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith("| compile-reference"))
    assert row.rstrip(" |").endswith("ok"), row  # the compiled provider really ran
    lines = [line.strip() for line in re.split(r"[\r\n]+", done.stderr) if line.strip()]
    noisy = [line for line in lines if "warn" in line.lower() or "CUDA" in line or TORCH_LOG_LINE.match(line)]
    assert not noisy, noisy
    assert all(line.startswith("bench:") for line in lines), lines  # only the progress bar is left


def test_float16_features_move_scores_as_the_readme_says():
    """README, "Features are stored as float16": `deltakern encode` L2-normalises in float32 and
    stores its default dtype; `deltakern score --features` reads them back as float32. On CLIP-like
    data (K=1000, D=512, τ=0.01) that moves ΔEnergy by at most a few 1e-3 (outside the float32
    contract) and AUROC by far less than 0.001 points; --dtype float32 changes nothing."""
    import torch

    import deltakern as dk
    from deltakern.core.constants import score_tolerance
    from deltakern.ood.synthetic import make_synthetic
    from deltakern.pipeline.settings import FEATURE_DTYPES, EncodeSettings

    default = EncodeSettings.__dataclass_fields__["dtype"].default
    assert default == "float16"
    s = make_synthetic(n=20_000, k=1000, d=512, seed=0)
    X32 = s.X / torch.linalg.vector_norm(s.X, dim=1, keepdim=True)  # as encode does, in float32
    exact = dk.score(X32, s.W, temperature=0.01, c=3)
    stored = dk.score(X32.to(FEATURE_DTYPES[default]).float(), s.W, temperature=0.01, c=3)
    for field, max_abs, max_rel in (("delta_energy", 5e-3, 5e-3), ("energy", 5e-3, 2.5e-4)):
        a, b = getattr(exact, field).double(), getattr(stored, field).double()
        err = (a - b).abs()
        assert float(err.max()) < max_abs and float((err / a.abs()).max()) < max_rel, field
    err = (exact.delta_energy - stored.delta_energy).abs() / exact.delta_energy.abs().clamp_min(1)
    assert float(err.max()) > score_tolerance(torch.float32)  # the README says: outside the float32 contract
    ood = s.is_ood
    for field in ("delta_energy", "energy"):
        a, b = getattr(exact, field), getattr(stored, field)
        assert abs(float(dk.metrics.auroc(a[~ood], a[ood])) - float(dk.metrics.auroc(b[~ood], b[ood]))) < 1e-5
    kept = dk.score(X32.to(FEATURE_DTYPES["float32"]).float(), s.W, temperature=0.01, c=3)
    assert torch.equal(kept.delta_energy, exact.delta_energy)


@needs_open_clip
def test_readme_parquet_example_runs_on_a_scored_folder(tmp_path, monkeypatch, capsys):
    pytest.importorskip("pyarrow")  # the clip extra
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Open the scores in Python", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1 and "pq.read_table" in blocks[0]
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (80 * i, 10, 10)).save(tmp_path / "imgs" / f"{i}.png")
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    monkeypatch.chdir(tmp_path)
    argv = ["score", "--model", "deltakern-tiny", "--pretrained", "none", "--images", "imgs", "--classes", "classes.txt",
            "--templates", "single", "--out", "scores.parquet", "--device", "cpu"]  # fmt: skip
    assert cli.main(argv) == 0
    capsys.readouterr()
    exec(compile(blocks[0], "README.md", "exec"), {})
    printed = capsys.readouterr().out
    rows = ast.literal_eval(printed.strip())
    assert [r["id"] for r in rows] and sorted(r["id"] for r in rows) == ["0.png", "1.png", "2.png"]
    assert [r["delta_energy"] for r in rows] == sorted(r["delta_energy"] for r in rows)
    assert {r["pred_name"] for r in rows} <= {"cat", "dog"}


def test_a_closed_pipe_ends_the_command_quietly():
    # `deltakern env | head -1`: the reader is gone. Made deterministic by closing the pipe's
    # read end before the command starts, so its first write (or final flush) fails.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", "deltakern.cli", "env"], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=120)  # fmt: skip
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
