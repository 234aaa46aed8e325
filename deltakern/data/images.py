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
import re
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltakern.core.errors import InvalidArgument

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


# How an image becomes the RGB picture the model's transform sees; recorded in the manifests
# ("preprocessing"), because each rule changes the pixels.
DECODE_RULES = {
    "frames": "the first frame of an animated image",
    "high_bit_depth": "16-bit and 32-bit integer images scaled to 8 bits by their nominal range; float images "
    "in [0, 1] scaled by 255, others clipped to [0, 255]",
    "transparency": "composited onto a white background",
    "colour": "CMYK, palette, grey and other modes converted to RGB by PIL",
    "too_large": "images over PIL's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS) fail",
}


class ImageDecodeError(Exception):
    """An image that cannot be decoded; the message is a stable reason recorded in the manifest."""


_ADDRESS = re.compile(r"\s*(?:at )?0x[0-9a-fA-F]+")


def _reason(exc: BaseException) -> str:
    """An exception's message without object addresses (they change from run to run)."""
    return _ADDRESS.sub("", str(exc)).strip() or type(exc).__name__


JPEG_DRAFT_RULE = (
    "JPEG files at least twice the model's input size on both sides are decoded at 1/2, 1/4 or 1/8 "
    "scale (DCT-domain downscaling), never below the input size on either side"
)


GPU_DECODE_RULE = (
    "JPEG files decoded by nvJPEG on the GPU and preprocessed there with torch's antialiased resize "
    "(deltakern.data.gpu_jpeg); other formats and JPEGs nvJPEG refuses as on the CPU"
)


def decoding_rules(*, exif_transpose: bool = True, jpeg_draft: bool = False, gpu_decode: bool = False) -> dict[str, Any]:
    """What :func:`decode_image` does to every image, for the manifest's ``preprocessing``."""
    rules: dict[str, Any] = {"exif_transpose": bool(exif_transpose), **DECODE_RULES}
    if jpeg_draft:  # absent when off: the manifests of runs without it stay as they were
        rules["jpeg_draft"] = JPEG_DRAFT_RULE
    if gpu_decode:
        rules["gpu_decode"] = GPU_DECODE_RULE
    return rules


def request_jpeg_draft(img: Any, min_side: int) -> bool:
    """Ask the JPEG decoder of the opened, not yet loaded ``img`` for a DCT-domain reduced size
    (1/2, 1/4 or 1/8) whose width and height both stay >= ``min_side``; True when it reduces.

    Both sides, not just the short one: CLIP's preprocessing resizes the short side to the
    input size and then center-crops, and the reduction must leave that final resampling to
    it. Rotation by the EXIF tag afterwards swaps the sides, which keeps both >= ``min_side``.
    Anything but a JPEG (or MPO, a JPEG with extra frames) is left untouched.
    """
    from PIL import JpegImagePlugin

    if not isinstance(img, JpegImagePlugin.JpegImageFile):
        return False
    w, h = img.size
    if min(w, h) < 2 * min_side:  # no reduction possible: keep the plain decoder set-up
        return False
    before = img.size
    img.draft(None, (min_side, min_side))  # PIL picks the largest scale keeping both sides >= these
    return img.size != before


def decode_image(data: bytes, *, exif_transpose: bool = True, draft_size: int | None = None) -> Any:
    """Decode encoded image bytes into an RGB ``PIL.Image`` following :data:`DECODE_RULES`.

    With ``exif_transpose`` the EXIF orientation tag is applied (a phone photo stored rotated
    comes out upright). With ``draft_size`` (the model's input side), a large JPEG is decoded
    at a reduced scale whose sides both stay >= ``draft_size`` (:func:`request_jpeg_draft`);
    None decodes at full size. Raises :class:`ImageDecodeError` with a stable, specific reason
    ("empty file (0 bytes)", "not a recognised image format", "truncated JPEG: ...") for
    anything that is not a decodable image; PIL's own warnings are not shown (one line per image
    in the manifest instead of a flood on the terminal).
    """
    import struct
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    if len(data) == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Over PIL.Image.MAX_IMAGE_PIXELS PIL warns (an error above twice the limit), at open
        # time from the header; both fail the image here, before any pixel is decoded.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        fmt = _sniff_format(data)
        try:
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format or fmt
                img.seek(0)  # the first frame of an animated GIF/WebP/PNG
                if draft_size is not None:
                    request_jpeg_draft(img, draft_size)
                img.load()  # decode now: truncated files fail here
                if exif_transpose:
                    img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
        except ImageDecodeError:
            raise
        except UnidentifiedImageError:
            raise ImageDecodeError("not a recognised image format") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageDecodeError(f"image too large: {_reason(exc)}") from None
        except (OSError, SyntaxError, EOFError, ValueError, struct.error, MemoryError) as exc:
            message = _reason(exc)
            kind = "truncated" if "truncat" in message.lower() or isinstance(exc, EOFError) else "corrupt"
            raise ImageDecodeError(f"{kind} {fmt}: {message}") from None


_MAGIC = (
    (b"\xff\xd8", "JPEG"), (b"\x89PNG", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
)  # fmt: skip


def _sniff_format(data: bytes) -> str:
    """The format the first bytes announce, for reasons of files PIL rejects while opening."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _MAGIC if data.startswith(magic)), "image")


def _to_rgb(img: Any) -> Any:
    """8-bit RGB from any PIL mode (see :data:`DECODE_RULES`)."""
    import numpy as np
    from PIL import Image

    mode = img.mode
    if mode.startswith("I") or mode == "F":
        a = np.asarray(img)
        if mode.startswith("I;16") or (mode == "I" and a.size and int(a.max()) > 255):
            a = np.clip(a.astype(np.float64), 0, 65535) / 257.0  # full 16-bit range onto 0..255
        elif mode == "F" and a.size and float(np.nanmax(a)) <= 1.0:
            a = a.astype(np.float64) * 255.0
        a = np.nan_to_num(a.astype(np.float64), nan=0.0)
        grey = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
        return grey.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return img.copy()
    return img.convert("RGB")


class DecodeDataset(torch.utils.data.Dataset):
    """Decodes images with ``preprocess`` (runs in DataLoader workers).

    Item ``i`` is ``(i, tensor or None, error or None, seconds)``: a failure to read or decode
    is returned as its reason (:func:`decode_image`), never raised, so one bad file cannot stop
    a run.
    """

    def __init__(
        self, items: Sequence[ImageItem], preprocess: Callable, *, exif_transpose: bool = True, draft_size: int | None = None
    ):
        self.items = items
        self.preprocess = preprocess
        self.exif_transpose = exif_transpose
        self.draft_size = draft_size  # decode_image's: the model's input side, or None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None, float]:
        start = time.perf_counter()
        try:
            data = read_image_bytes(self.items[i])
        except OSError as exc:
            return self.read_failure(i, exc, start)
        return self.decode_item(i, data, start)

    @staticmethod
    def read_failure(i: int, exc: OSError, start: float) -> tuple[int, None, str, float]:
        """Item ``i`` when its file cannot be read."""
        # The path is in the record's source; strerror keeps the reason the same everywhere.
        return i, None, f"cannot read file: {exc.strerror or _reason(exc)}", time.perf_counter() - start

    def decode_item(self, i: int, data: bytes, start: float) -> tuple[int, torch.Tensor | None, str | None, float]:
        """Item ``i`` from its bytes already read (``start``: when reading began, for the seconds)."""
        try:
            rgb = decode_image(data, exif_transpose=self.exif_transpose, draft_size=self.draft_size)
        except ImageDecodeError as exc:  # a file that cannot be decoded is data, not a crash
            return i, None, str(exc), time.perf_counter() - start
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
        # default_collate stacks straight into shared memory in a worker (torch.stack would need
        # a second copy of the batch there when it is sent to the main process).
        images=torch.utils.data.default_collate([s[1] for s in ok]) if ok else None,
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
