"""Command-line points of a new user's trial run: an unknown option shows the subcommand's usage
(with the nearest option), `deltakern models` lists architectures and tags offline, an
unknown --model names the nearest architectures, and `deltakern bench` on a machine without a
GPU prints no torch.compile warnings."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys

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
