"""Command-line points of a new user's trial run: an unknown option shows the subcommand's usage
(with the nearest option), `deltakern models` lists architectures and tags offline, and an
unknown --model names the nearest architectures."""

from __future__ import annotations

import socket

import pytest
from PIL import Image

from deltakern import cli

pytest.importorskip("open_clip")

TOP_LEVEL_USAGE = "usage: deltakern [-h] [--version] COMMAND"


def run(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse errors exit
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


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
