"""Small generated image sets for the pipeline tests."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np

CORRUPT_ID = "b/corrupt.jpg"


def make_image_folder(root: Path, n: int = 50, *, seed: int = 0) -> list[str]:
    """``n`` small random images (JPEG and PNG, odd sizes, two subfolders) plus one corrupt JPEG.

    Returns the ids (relative paths) of the readable images, in sorted order.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    ids = []
    for i in range(n):
        sub = "a" if i % 2 else "b/c"
        ext = "png" if i % 3 == 0 else "jpg"
        rel = f"{sub}/img{i:03d}.{ext}"
        h, w = (int(v) for v in rng.integers(20, 48, size=2))
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        ids.append(rel)
    # A JPEG header followed by garbage: opens as a JPEG, fails to decode.
    bad = root / CORRUPT_ID
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 256, size=200, dtype=np.uint8)))
    (root / "notes.txt").write_text("not an image\n")
    return sorted(ids)


def make_tar_shards(root: Path, out_dir: Path, ids: list[str], per_tar: int) -> str:
    """Pack ``ids`` (relative to ``root``) into tars of ``per_tar`` members in order; returns the
    brace pattern naming them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    chunks = [ids[i : i + per_tar] for i in range(0, len(ids), per_tar)]
    for k, chunk in enumerate(chunks):
        with tarfile.open(out_dir / f"shard-{k:04d}.tar", "w") as tar:
            for rel in chunk:
                tar.add(root / rel, arcname=rel)
    return str(out_dir / f"shard-{{0000..{len(chunks) - 1:04d}}}.tar")


def encoded(img, fmt: str, **save_kwargs) -> bytes:
    """``img`` (a PIL image) encoded as ``fmt``."""
    import io

    buf = io.BytesIO()
    img.save(buf, fmt, **save_kwargs)
    return buf.getvalue()


def asymmetric_rgb(h: int = 12, w: int = 20):
    """An RGB picture whose every rotation and flip differs: red left, blue right, a green band on
    top (the top quarter, at least one row)."""
    from PIL import Image

    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[:, : w // 2] = (255, 0, 0)
    a[:, w // 2 :] = (0, 0, 255)
    a[: max(1, h // 4), :] = (0, 255, 0)
    return Image.fromarray(a)


def make_bad_files(root: Path) -> dict[str, str]:
    """Files that are not decodable images, by id, with the start of the reason each must get."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    jpeg = encoded(Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)), "JPEG")
    files = {
        "empty.jpg": (b"", "empty file (0 bytes)"),
        "text.jpg": (b"this is a text file, renamed\n", "not a recognised image format"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated JPEG: "),
    }
    for name, (data, _) in files.items():
        (root / name).write_bytes(data)
    return {name: reason for name, (_, reason) in files.items()}
