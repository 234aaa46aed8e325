"""``deltakern inspect``: a contact sheet of the most OOD and most ID images of a scored run.

One pass over the score column (4 bytes per row) finds the N lowest and N highest scores and
the histogram; a second pass over the batches fetches only those rows' ids, paths and predicted
class names. Thumbnails are embedded in the HTML (base64 JPEG), so the page opens offline;
``--png`` draws the same sheet as one image.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXAMPLE = """\
examples:
  deltakern inspect scores.parquet --out sheet.html
  deltakern inspect scores.parquet --images 'shards/{0000..0099}.tar' --threshold T.json \\
      --n 32 --out sheet.html --png sheet.png

Images are found by the rows' ids in --images (a folder, a file list or webdataset shards, as
given to `deltakern score`); without --images the rows' source paths are opened directly.
"""


@dataclass
class Tile:
    """One image of the sheet."""

    row: int
    score: float
    id: str
    source: str
    pred_name: str
    thumb: Any = None  # PIL image, or None when the image could not be found or decoded
    problem: str | None = None


def extremes(values, n: int) -> tuple[list[int], list[int]]:
    """Row indices of the ``n`` lowest scores (lowest first) and the ``n`` highest (highest
    first); equal scores in row order. NaN scores are never chosen."""
    import numpy as np

    finite_or_inf = np.flatnonzero(~np.isnan(values))
    v = values[finite_or_inf]
    n = min(n, v.size)
    if n == 0:
        return [], []
    low = np.argpartition(v, n - 1)[:n] if n < v.size else np.arange(v.size)
    high = np.argpartition(-v, n - 1)[:n] if n < v.size else np.arange(v.size)
    low = low[np.lexsort((low, v[low]))]
    high = high[np.lexsort((high, -v[high]))]
    return finite_or_inf[low].tolist(), finite_or_inf[high].tolist()


def fetch_rows(scored, rows: list[int], score: str, batch_rows: int = 65_536) -> dict[int, Tile]:
    """The tiles of the given global row indices, reading the batches once."""
    from deltakern.cli.commands.filter import iter_batches

    wanted, out, offset = sorted(set(rows)), {}, 0
    pos = 0
    for batch in iter_batches(scored.files, batch_rows, ["id", "source", "pred_name", score]):
        end = offset + batch.num_rows
        picks = []
        while pos < len(wanted) and wanted[pos] < end:
            picks.append(wanted[pos])
            pos += 1
        if picks:
            cols = {name: batch.column(name) for name in ("id", "source", "pred_name", score)}
            for r in picks:
                i = r - offset
                out[r] = Tile(r, float(cols[score][i].as_py()), cols["id"][i].as_py() or "", cols["source"][i].as_py() or "",
                              cols["pred_name"][i].as_py() or "")  # fmt: skip
        offset = end
        if pos == len(wanted):
            break
    return out


def load_thumbnails(tiles: list[Tile], images: str | None, size: int) -> None:
    """Decode and shrink every tile's image (found by id in ``images``, else by its source)."""
    import os

    from deltakern.data.images import ImageItem, decode_image, open_source, read_image_bytes

    items: dict[str, ImageItem] = {}
    if images is not None:
        need = {t.id for t in tiles}
        for shard in open_source(images).plan(1 << 30):
            for item in shard.list_items():
                if item.id in need:
                    items[item.id] = item
            if len(items) == len(need):
                break
    for t in tiles:
        item = items.get(t.id)
        if item is None and images is None and os.path.isfile(t.source):
            item = ImageItem(id=t.id, source=t.source)
        if item is None:
            t.problem = "image not found" + (f" in {images}" if images else f" at {t.source}")
            continue
        try:
            img = decode_image(read_image_bytes(item))
            img.thumbnail((size, size))
            t.thumb = img
        except Exception as exc:  # noqa: BLE001 - a broken image becomes a labelled gap, not a failed sheet
            t.problem = f"cannot decode: {exc}"


def _data_uri(img, fmt: str = "JPEG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=85) if fmt == "JPEG" else img.save(buf, format=fmt)
    mime = "jpeg" if fmt == "JPEG" else fmt.lower()
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def histogram_figure(values, score: str, threshold: float | None, width: float = 10.0):
    """A matplotlib figure of the score histogram with the threshold marked (Agg, no pyplot)."""
    import numpy as np
    from matplotlib.figure import Figure

    finite = values[np.isfinite(values)]
    fig = Figure(figsize=(width, 2.6), dpi=100)
    ax = fig.add_subplot()
    ax.hist(finite, bins=80, color="#4c72b0")
    ax.set_xlabel(f"{score} (higher = more in-distribution)")
    ax.set_ylabel("rows")
    if threshold is not None and math.isfinite(threshold):
        kept = float(np.count_nonzero(values >= threshold)) / max(1, values.size)
        ax.axvline(threshold, color="#c44e52", linewidth=2)
        ax.text(threshold, ax.get_ylim()[1] * 0.92, f" threshold {threshold:.4g}: keeps {kept:.1%}", color="#c44e52")
    fig.tight_layout()
    return fig


def render_html(
    title: str, subtitle: str, hist_png: bytes, sections: list[tuple[str, list[Tile]]], size: int, threshold: float | None = None
) -> str:
    """The self-contained page; with ``threshold`` the tiles it rejects are marked."""
    e = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title><style>",
        "body{font-family:sans-serif;margin:16px;background:#fafafa}",
        f".grid{{display:grid;grid-template-columns:repeat(auto-fill,minmax({size + 16}px,1fr));gap:8px}}",
        ".tile{background:#fff;border:1px solid #ddd;padding:4px;font-size:12px;overflow:hidden}",
        f".tile img,.missing{{width:{size}px;height:{size}px;object-fit:contain;display:block;background:#eee}}",
        ".rejected{border:2px solid #c44e52}.rejected .score::after{content:' rejected';color:#c44e52}",
        ".score{font-weight:bold}.id{color:#666;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}",
        "</style></head><body>",
        f"<h1>{e(title)}</h1><p>{e(subtitle)}</p>",
        "<img class='hist' alt='score histogram' src='data:image/png;base64," + base64.b64encode(hist_png).decode("ascii") + "'>",
    ]
    for heading, tiles in sections:
        parts.append(f"<h2>{e(heading)}</h2><div class='grid'>")
        for t in tiles:
            picture = (f"<img alt='{e(t.id)}' src='{_data_uri(t.thumb)}'>" if t.thumb is not None
                       else f"<div class='missing' title='{e(t.problem or '')}'>{e(t.problem or '')}</div>")  # fmt: skip
            rejected = " rejected" if threshold is not None and not t.score >= threshold else ""
            parts.append(
                f"<div class='tile{rejected}' data-row='{t.row}'>{picture}<div class='score'>{t.score:.4f}</div>"
                f"<div>{e(t.pred_name)}</div><div class='id' title='{e(t.source)}'>{e(t.id)}</div></div>"
            )
        parts.append("</div>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def render_png(path: Path, title: str, values, score: str, threshold: float | None, sections, size: int, columns: int = 8) -> None:
    """The same sheet drawn with matplotlib into one PNG (written atomically)."""
    import numpy as np
    from matplotlib.figure import Figure

    from deltakern.data.atomic import atomic_path

    rows_per = [max(1, math.ceil(len(tiles) / columns)) for _, tiles in sections]
    tile_in = size / 100 + 0.45
    height = 3.2 + sum(r * tile_in + 0.5 for r in rows_per)
    fig = Figure(figsize=(columns * tile_in, height), dpi=100)
    fig.suptitle(title, fontsize=11)
    top = 1 - 0.5 / height
    hist_h = 2.4 / height
    ax = fig.add_axes((0.08, top - hist_h, 0.88, hist_h - 0.35 / height))
    finite = values[np.isfinite(values)]
    ax.hist(finite, bins=80, color="#4c72b0")
    ax.set_xlabel(score, fontsize=8)
    if threshold is not None and math.isfinite(threshold):
        ax.axvline(threshold, color="#c44e52", linewidth=2)
    y = top - hist_h - 0.3 / height
    for (heading, tiles), nrows in zip(sections, rows_per):
        fig.text(0.01, y - 0.25 / height, heading, fontsize=10, weight="bold")
        y -= 0.45 / height
        for k, t in enumerate(tiles):
            r, c = divmod(k, columns)
            cell = fig.add_axes((c / columns + 0.002, y - (r + 1) * tile_in / height, 1 / columns - 0.004, tile_in / height * 0.8))
            cell.set_axis_off()
            if t.thumb is not None:
                cell.imshow(np.asarray(t.thumb))
            else:
                cell.text(0.5, 0.5, "missing", ha="center", va="center", fontsize=7)
            cell.set_title(f"{t.score:.3f} {t.pred_name}"[:28], fontsize=7)
        y -= nrows * tile_in / height
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def register(sub: argparse._SubParsersAction) -> None:
    from deltakern.ood.threshold import SCORE_NAMES

    p = sub.add_parser(
        "inspect",
        help="contact sheet (HTML, optionally PNG) of the most OOD and most ID images of a scored run",
        description="Build a self-contained HTML contact sheet of a scored parquet: the N most "
        "out-of-distribution and the N most in-distribution images as thumbnails with their score "
        "and predicted class, and the score histogram with the threshold marked when one is given.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("scores", metavar="SCORES", help="scored parquet file (x.parquet) or folder of parts (x.parts/)")
    p.add_argument("--images", metavar="SRC", help="the images the scores came from (folder, file list or webdataset shards)")
    p.add_argument("--out", required=True, metavar="SHEET.html", help="HTML file to write")
    p.add_argument("--png", metavar="SHEET.png", help="also draw the sheet as a PNG image")
    p.add_argument("--n", type=int, default=24, help="images per section (default 24)")
    p.add_argument("--score", choices=SCORE_NAMES, default=None,
                   help="score column (default: the threshold's score, else delta_energy)")
    p.add_argument("--threshold", metavar="T.json", help="threshold of `deltakern calibrate` to mark on the histogram")
    p.add_argument("--thumb", type=int, default=128, help="thumbnail size in pixels (default 128)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deltakern.cli.commands.filter import identity_of, open_scored, read_scores
    from deltakern.core.errors import InvalidArgument
    from deltakern.core.validation import check_int_range
    from deltakern.data.atomic import write_text
    from deltakern.ood.threshold import load_threshold

    check_int_range("n", args.n, 1, 10_000)
    check_int_range("thumb", args.thumb, 16, 1024)
    scored = open_scored(args.scores)
    threshold = load_threshold(args.threshold) if args.threshold else None
    score = args.score or (threshold.identity.score if threshold else "delta_energy")
    identity = identity_of(scored, score)
    if threshold is not None:
        if threshold.identity.score != score:
            raise InvalidArgument(f"threshold is for {threshold.identity.score!r}, not --score {score!r}", param="score")
        threshold.check(identity)
    values = read_scores(scored, score)
    if values.size == 0:
        raise InvalidArgument(f"{scored.path} holds no rows", param="scores")
    low, high = extremes(values, args.n)
    tiles = fetch_rows(scored, low + high, score)
    load_thumbnails(list(tiles.values()), args.images, args.thumb)
    sections = [
        (f"{len(low)} most out-of-distribution (lowest {score})", [tiles[r] for r in low]),
        (f"{len(high)} most in-distribution (highest {score})", [tiles[r] for r in high]),
    ]
    t_value = threshold.value if threshold else None
    title = f"{scored.path.name}: {values.size} rows, {score}"
    subtitle = (
        f"model {identity.model} ({identity.pretrained}), c={identity.c}, temperature={identity.temperature}, "
        f"reset={identity.reset}, mode={identity.mode}"
        + (f"; threshold {t_value!r} keeps {float((values >= t_value).mean()):.2%} of these rows" if threshold else "")
    )
    fig = histogram_figure(values, score, t_value)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_text(args.out, render_html(title, subtitle, buf.getvalue(), sections, args.thumb, t_value))
    if args.png:
        render_png(Path(args.png), title, values, score, t_value, sections, args.thumb)
    missing = sum(1 for t in tiles.values() if t.thumb is None)
    print(f"contact sheet of {len(low)} + {len(high)} images written to {args.out}"
          + (f" and {args.png}" if args.png else "") + (f"; {missing} image(s) missing or undecodable" if missing else ""))  # fmt: skip
    return 0
