"""Image sources and decoding in DataLoader workers.

Sources (:func:`open_source` picks one from the ``--images`` argument):

- a folder, searched recursively for files with a common image extension
  (:data:`IMAGE_EXTENSIONS`), in sorted path order; an image's id is its path relative to the
  folder;
- a file list: ``.txt``/``.lst`` (one path per line, ``#`` comments) or ``.csv``/``.tsv`` (a
  header with a ``path`` column and optionally an ``id`` column); relative paths are relative
  to the list file's directory; the id is the ``id`` column or the path as written;
- webdataset tar shards: one ``.tar`` path, a brace pattern (``shards/{0000..0099}.tar``), or
  several separated by ``::``. Every tar member with an image extension is one image, its id
  is the member name (so a tar made from a folder gives the folder's ids). Uncompressed tars
  are read by offset, so any worker can decode any image.

Work is cut into fixed shards (:class:`ShardPlan`): consecutive runs of ``shard_size`` images
for folders and lists, one shard per tar for webdataset sources. Decoding runs in DataLoader
workers with the model's own preprocessing; an image that cannot be read or decoded is
reported (id, source, error) and skipped, never fatal.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltakern.core.errors import InvalidArgument


def _decode_errors() -> tuple[type[BaseException], ...]:
    """What reading or decoding an image may raise: I/O and format errors (``OSError`` covers
    PIL's ``UnidentifiedImageError`` and truncated files), the parsers' own ``SyntaxError``,
    ``EOFError``, ``ValueError`` and ``struct.error``, and PIL's decompression-bomb error."""
    import struct

    from PIL import Image

    return (OSError, SyntaxError, EOFError, ValueError, struct.error, Image.DecompressionBombError)


IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".csv", ".tsv"})
TAR_SEPARATOR = "::"


@dataclass(frozen=True)
class ImageItem:
    """One image to decode: a file, or a member of a tar (by byte offset, or inline bytes)."""

    id: str
    source: str  # file path, or the tar's path
    offset: int = -1  # data offset of the member in an uncompressed tar
    size: int = -1
    data: bytes | None = None  # the member's bytes when the tar is compressed


@dataclass
class ShardPlan:
    """A fixed unit of work: shard ``index`` of a source and how to list its images."""

    index: int
    items: list[ImageItem] | None = None  # known up front (folders, lists)
    tar: str | None = None  # listed on demand (webdataset)
    _listed: list[ImageItem] | None = field(default=None, repr=False)

    def list_items(self) -> list[ImageItem]:
        """The shard's images in order (indexes the tar on first call)."""
        if self.items is not None:
            return self.items
        if self._listed is None:
            self._listed = index_tar(self.tar)  # type: ignore[arg-type]
        return self._listed


def _has_image_extension(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _sha256_lines(lines: Iterator[str]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8", "surrogateescape"))
        h.update(b"\n")
    return h.hexdigest()


class ImageSource:
    """A list of images cut into fixed shards; see the module docstring for the kinds."""

    def __init__(self, kind: str, spec: str, items: list[ImageItem] | None = None, tars: list[str] | None = None):
        self.kind = kind  # "folder", "list" or "webdataset"
        self.spec = spec
        self._items = items
        self._tars = tars

    def __len__(self) -> int:
        """Number of images, or of tar shards for webdataset sources (their sizes are unknown)."""
        return len(self._items) if self._items is not None else len(self._tars or [])

    def plan(self, shard_size: int) -> list[ShardPlan]:
        """Cut the source into shards of ``shard_size`` images (one per tar for webdataset)."""
        from deltakern.core.validation import check_int_range

        shard_size = check_int_range("shard_size", shard_size, 1, 1 << 40)
        if self._tars is not None:
            return [ShardPlan(index=i, tar=t) for i, t in enumerate(self._tars)]
        items = self._items or []
        return [
            ShardPlan(index=i, items=items[start : start + shard_size])
            for i, start in enumerate(range(0, len(items), shard_size))
        ]

    def fingerprint(self) -> dict[str, Any]:
        """What must stay the same for a resumed run to continue this one."""
        if self._tars is not None:
            stats = [(t, os.path.getsize(t), os.stat(t).st_mtime_ns) for t in self._tars]
            return {"kind": self.kind, "tars": len(stats), "sha256": _sha256_lines(f"{t}\t{s}\t{m}" for t, s, m in stats)}
        items = self._items or []
        return {
            "kind": self.kind,
            "images": len(items),
            "sha256": _sha256_lines(f"{it.id}\t{it.source}" for it in items),
        }


def open_source(spec: str) -> ImageSource:
    """The image source ``spec`` names: a folder, a file list, or tar shard(s)."""
    if not isinstance(spec, str) or not spec:
        raise InvalidArgument(f"images must be a folder, a file list or webdataset tar shards, got {spec!r}")
    parts = spec.split(TAR_SEPARATOR)
    if any(".tar" in p for p in parts) and not os.path.isdir(spec):
        return ImageSource("webdataset", spec, tars=expand_tar_pattern(spec))
    if os.path.isdir(spec):
        items = list_folder(spec)
        if not items:
            raise InvalidArgument(
                f"images folder {spec!r} holds no image files (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        return ImageSource("folder", spec, items=items)
    if os.path.isfile(spec) and os.path.splitext(spec)[1].lower() in LIST_EXTENSIONS:
        return ImageSource("list", spec, items=read_file_list(spec))
    raise InvalidArgument(
        "images must be an existing folder, a file list (.txt, .lst, .csv, .tsv) or webdataset "
        f"tar shards ('shards/{{0000..0099}}.tar'), got {spec!r}"
    )


def list_folder(root: str | os.PathLike) -> list[ImageItem]:
    """Every image file under ``root`` (recursive, symlinks followed), sorted by relative path."""
    root = os.path.abspath(root)
    found: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in filenames:
            if _has_image_extension(name) and not name.startswith("."):
                full = os.path.join(dirpath, name)
                found.append((Path(os.path.relpath(full, root)).as_posix(), full))
    found.sort()
    return [ImageItem(id=rel, source=full) for rel, full in found]


def read_file_list(path: str | os.PathLike) -> list[ImageItem]:
    """Images named by a text list (one path per line) or a CSV/TSV with a ``path`` column."""
    base = os.path.dirname(os.path.abspath(path))
    ext = os.path.splitext(str(path))[1].lower()
    rows: list[tuple[str, str]] = []
    with open(path, newline="", encoding="utf-8") as f:
        if ext in (".csv", ".tsv"):
            reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
            columns = reader.fieldnames or []
            if "path" not in columns:
                raise InvalidArgument(f"images list {path} must have a 'path' column, got columns {columns}")
            for row in reader:
                if row["path"]:
                    rows.append((row.get("id") or row["path"], row["path"]))
        else:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    rows.append((line, line))
    if not rows:
        raise InvalidArgument(f"images list {path} names no images")
    return [ImageItem(id=i, source=os.path.join(base, p)) for i, p in rows]


def expand_tar_pattern(spec: str) -> list[str]:
    """The tar paths of a webdataset spec: brace patterns expanded, ``::`` separated lists."""
    from braceexpand import braceexpand

    tars = [t for part in spec.split(TAR_SEPARATOR) for t in braceexpand(part)]
    missing = [t for t in tars if not os.path.isfile(t)]
    if missing:
        raise InvalidArgument(
            f"images names {len(tars)} tar shard(s) and {len(missing)} do not exist, e.g. {missing[0]!r} "
            "(tar shards must be local files)"
        )
    return tars


def index_tar(path: str) -> list[ImageItem]:
    """The image members of one tar, in archive order.

    Uncompressed tars are indexed by data offset (workers read each image with one seek);
    compressed ones cannot be seeked, so their image bytes are read here.
    """
    items: list[ImageItem] = []
    plain = _is_plain_tar(path)
    with tarfile.open(path, "r:" if plain else "r:*") as tar:
        for member in tar:
            if not member.isfile() or not _has_image_extension(member.name):
                continue
            if plain:
                items.append(ImageItem(id=member.name, source=path, offset=member.offset_data, size=member.size))
            else:
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                items.append(ImageItem(id=member.name, source=path, data=data))
    return items


def _is_plain_tar(path: str) -> bool:
    """True for an uncompressed tar (members can be read by offset)."""
    try:
        with tarfile.open(path, "r:"):
            return True
    except tarfile.ReadError:
        return False


def read_image_bytes(item: ImageItem) -> bytes:
    """The encoded bytes of one image."""
    if item.data is not None:
        return item.data
    with open(item.source, "rb") as f:
        if item.offset >= 0:
            f.seek(item.offset)
            data = f.read(item.size)
            if len(data) != item.size:
                raise OSError(f"tar member truncated: read {len(data)} of {item.size} bytes")
            return data
        return f.read()


class DecodeDataset(torch.utils.data.Dataset):
    """Decodes images with ``preprocess`` (runs in DataLoader workers).

    Item ``i`` is ``(i, tensor or None, error or None, seconds)``: a failure to read or decode
    is returned as its message, never raised, so one bad file cannot stop a run.
    """

    def __init__(self, items: Sequence[ImageItem], preprocess: Callable):
        self.items = items
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None, float]:
        from PIL import Image

        DECODE_ERRORS = _decode_errors()
        start = time.perf_counter()
        try:
            with Image.open(io.BytesIO(read_image_bytes(self.items[i]))) as img:
                img.load()  # decode now: truncated files fail here, inside the try
                rgb = img.convert("RGB")
        except DECODE_ERRORS as exc:  # a file that cannot be read or decoded is data, not a crash
            return i, None, f"{type(exc).__name__}: {exc}", time.perf_counter() - start
        # Outside the try: an error in preprocessing is a bug (of the model's transform or of
        # deltakern), and must stop the run rather than be recorded against the image.
        tensor = self.preprocess(rgb)
        return i, tensor, None, time.perf_counter() - start


@dataclass
class DecodedBatch:
    positions: torch.Tensor  # [b] dataset indices of the decoded images, in order
    images: torch.Tensor | None  # [b, 3, H, W], None when every image of the batch failed
    failed: list[tuple[int, str]]  # (dataset index, error) of the images that failed
    decode_s: float  # worker seconds spent reading + decoding + preprocessing

    def pin_memory(self) -> "DecodedBatch":
        # DataLoader(pin_memory=True) calls this on custom batch types.
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


def collate_decoded(samples: list[tuple[int, torch.Tensor | None, str | None, float]]) -> DecodedBatch:
    """Stack the decoded images of a batch; keep the failures aside."""
    ok = [s for s in samples if s[1] is not None]
    return DecodedBatch(
        positions=torch.tensor([s[0] for s in ok], dtype=torch.int64),
        images=torch.stack([s[1] for s in ok]) if ok else None,  # type: ignore[misc]
        failed=[(s[0], s[2]) for s in samples if s[1] is None],  # type: ignore[misc]
        decode_s=sum(s[3] for s in samples),
    )


def shard_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of dataset indices over consecutive shards; no batch spans two shards."""
    batches: list[list[int]] = []
    start = 0
    for n in lengths:
        batches.extend(list(range(b, min(b + batch_size, start + n))) for b in range(start, start + n, batch_size))
        start += n
    return batches
