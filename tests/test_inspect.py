"""`deltakern inspect`: the contact sheet picks the right rows, finds images in folders, file
lists and webdataset shards, opens offline, renders in headless Chromium and as a PNG."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

from deltakern import cli  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _scored import write_scored  # noqa: E402

N_ROWS, N = 60, 6


def colour(row: int) -> tuple[int, int, int]:
    """A distinct solid colour per row, far from grey and white."""
    return (40 + (row * 37) % 200, 40 + (row * 91) % 200, 40 + (row * 53) % 200)


def jpeg(row: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), colour(row)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    scored = write_scored(root / "s.parquet", N_ROWS, seed=7, parts=2)
    ids = pq.read_table(scored).column("id").to_pylist()
    folder = root / "imgs"
    folder.mkdir()
    for row, name in enumerate(ids):
        (folder / name).write_bytes(jpeg(row))
    listing = root / "list.csv"
    listing.write_text("path,id\n" + "".join(f"{folder / name},{name}\n" for name in ids))
    tar = root / "shard-0000.tar"
    with tarfile.open(tar, "w") as tf:
        for row, name in enumerate(ids):
            data = jpeg(row)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    # The same rows with source paths that exist: inspect opens them when --images is not given.
    table = pq.read_table(scored)
    table = table.set_column(table.schema.get_field_index("source"), "source", pa.array([str(folder / i) for i in ids]))
    with_sources = root / "src.parquet"
    pq.write_table(table, with_sources)
    shutil.copy(scored.with_suffix(".manifest.json"), with_sources.with_suffix(".manifest.json"))
    return {"root": root, "scored": scored, "with_sources": with_sources, "folder": folder, "list": listing, "tar": tar}


def expected_rows(scored: Path) -> tuple[list[int], list[int]]:
    s = pq.read_table(scored).column("delta_energy").to_numpy()
    order = np.lexsort((np.arange(s.size), s))  # ascending score, ties in row order
    high = np.lexsort((np.arange(s.size), -s))
    return order[:N].tolist(), high[:N].tolist()


def tile_rows(page: str) -> list[int]:
    return [int(r) for r in re.findall(r"data-row='(\d+)'", page)]


@pytest.mark.parametrize("kind", ["folder", "list", "tar", "sources"])
def test_sheet_picks_the_extreme_rows_and_embeds_their_images(sources, tmp_path, capsys, kind):
    out = tmp_path / "sheet.html"
    scored = sources["with_sources"] if kind == "sources" else sources["scored"]
    images = [] if kind == "sources" else ["--images", str(sources[kind])]
    assert cli.main(["inspect", str(scored), *images, "--n", str(N), "--out", str(out)]) == 0
    page = out.read_text()
    low, high = expected_rows(sources["scored"])
    assert tile_rows(page) == low + high
    assert page.count("src='data:image/jpeg;base64,") == 2 * N  # every thumbnail embedded
    assert "http" not in page and "file:" not in page  # nothing to fetch: opens offline
    table = pq.read_table(sources["scored"]).to_pydict()
    for r in low + high:
        assert f"{table['delta_energy'][r]:.4f}" in page and table["pred_name"][r] in page
    assert "missing" not in capsys.readouterr().out


def test_missing_images_become_labelled_gaps_and_threshold_is_checked(sources, tmp_path, capsys):
    T = tmp_path / "T.json"
    assert cli.main(["calibrate", str(sources["scored"]), "--out", str(T)]) == 0
    out = tmp_path / "sheet.html"
    empty = tmp_path / "other"
    empty.mkdir()
    Image.new("RGB", (8, 8)).save(empty / "unrelated.png")
    assert cli.main(["inspect", str(sources["scored"]), "--images", str(empty), "--threshold", str(T), "--out", str(out)]) == 0
    page = out.read_text()
    assert page.count("image not found") >= 2 * N and "threshold" in page and "keeps" in page
    # tiles below the threshold are marked, the others not
    value = json.loads(T.read_text())["value"]
    marked = {int(r) for r in re.findall(r"class='tile rejected' data-row='(\d+)'", page)}
    scores = pq.read_table(sources["scored"]).column("delta_energy").to_pylist()
    assert marked and marked == {r for r in tile_rows(page) if scores[r] < value}
    other = write_scored(tmp_path / "c3.parquet", 20, c=3)
    assert cli.main(["inspect", str(other), "--threshold", str(T), "--out", str(tmp_path / "x.html")]) == 2
    assert "other settings" in capsys.readouterr().err


def _has_colour(img: Image.Image, rgb: tuple[int, int, int], tol: int = 6, min_pixels: int = 100) -> bool:
    a = np.asarray(img.convert("RGB")).astype(int)
    return int((np.abs(a - np.array(rgb)).max(axis=2) <= tol).sum()) >= min_pixels


def test_png_sheet_shows_the_thumbnails(sources, tmp_path):
    out, png = tmp_path / "sheet.html", tmp_path / "sheet.png"
    assert cli.main(["inspect", str(sources["scored"]), "--images", str(sources["folder"]), "--n", str(N),
                     "--out", str(out), "--png", str(png)]) == 0  # fmt: skip
    img = Image.open(png)
    img.load()
    assert img.width > 400 and img.height > 400
    low, high = expected_rows(sources["scored"])
    for r in (low[0], high[0], low[-1]):
        assert _has_colour(img, colour(r)), r


def test_sheet_renders_in_headless_chromium(sources, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium)")
    out = tmp_path / "sheet.html"
    assert cli.main(["inspect", str(sources["scored"]), "--images", str(sources["tar"]), "--n", str(N), "--out", str(out)]) == 0
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={shot}",
           "--window-size=1400,1600", out.as_uri()]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    img = Image.open(shot)
    img.load()
    low, high = expected_rows(sources["scored"])
    for r in (low[0], high[0]):  # the first thumbnail of each section is on screen
        assert _has_colour(img, colour(r)), r
    # text is drawn: dark pixels (scores, class names) beside the thumbnails
    assert (np.asarray(img.convert("L")) < 60).sum() > 500
