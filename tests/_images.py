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
