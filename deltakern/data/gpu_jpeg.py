"""JPEG decoding on the GPU (``gpu_decode``): DataLoader workers only read JPEG files, the main
process decodes them in batches with ``torchvision.io.decode_jpeg(..., device="cuda")`` (nvJPEG)
and preprocesses them as tensors on the device.

Everything else stays on the CPU path of :mod:`deltakern.data.images`: other formats are decoded
and preprocessed in the workers as usual, and a JPEG the GPU decoder refuses (CMYK, some
progressive or damaged files) is decoded by :func:`~deltakern.data.images.decode_image` in the
main process, so a file fails only when the CPU decoder fails on it too, with the same reason.

nvJPEG does not apply the EXIF orientation tag, so the workers read it from the header and the
main process turns the decoded tensor (:func:`orient`), the same way ``PIL.ImageOps.exif_transpose``
does on the CPU path.

The tensor preprocessing follows open_clip's inference transform for ``resize_mode="shortest"``
(resize the short side to the input size with antialiasing, center-crop, scale to [0, 1],
normalise); its resampling is torch's, not PIL's, so pixels differ slightly from the CPU path.
The device is a parameter: on ``"cpu"`` the same code runs with torchvision's CPU decoder (how it
is tested without a GPU).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from deltakern.core.errors import InvalidArgument
from deltakern.data.images import DecodeDataset, DecodedBatch, ImageDecodeError, decode_image, read_image_bytes

JPEG_MAGIC = b"\xff\xd8\xff"


def is_jpeg(data: bytes) -> bool:
    """True when ``data`` starts like a JPEG file (by content, not by file name)."""
    return data[:3] == JPEG_MAGIC


def jpeg_is_complete(data: bytes) -> bool:
    """True when the last scan of a JPEG is followed by an end-of-image marker (FF D9).

    Entropy-coded data never holds FF D9 (a data byte FF is stuffed as FF 00), so a file cut
    short inside or after its last scan (FF DA) has no FF D9 after it. nvJPEG decodes such a
    file and fills the missing part, where PIL refuses it ("image file is truncated"): the
    passthrough hands only complete files to the device and leaves the rest to the CPU path,
    so a file fails on both paths alike. Bytes after the marker (camera trailers) are allowed.
    """
    return data.rfind(b"\xff\xd9") > data.rfind(b"\xff\xda")


@dataclass(frozen=True)
class TensorPreprocess:
    """open_clip's ``shortest`` inference transform on uint8 ``[3, H, W]`` tensors."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> TensorPreprocess:
        """From a model's ``preprocess_cfg``; refuses transforms it does not reproduce."""
        mode = cfg.get("resize_mode", "shortest")
        size = cfg.get("size")
        sizes = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        if mode != "shortest" or sizes[0] != sizes[1] or cfg.get("interpolation", "bicubic") not in ("bicubic", "bilinear"):
            raise InvalidArgument(
                f"gpu_decode supports square inputs with resize_mode 'shortest' and bicubic or bilinear resizing, "
                f"the model's preprocessing is {cfg}",
                param="gpu_decode",
            )
        return cls(int(sizes[0]), tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("interpolation", "bicubic"))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 ``[3, H, W]`` -> normalised float32 ``[3, size, size]`` on the same device."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        mode = InterpolationMode.BICUBIC if self.interpolation == "bicubic" else InterpolationMode.BILINEAR
        resized = F.resize(image, [self.size], interpolation=mode, antialias=True)  # short side -> size
        cropped = F.center_crop(resized, [self.size, self.size])
        return F.normalize(cropped.float() / 255.0, list(self.mean), list(self.std))


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """``image`` ``[C, H, W]`` turned upright for an EXIF orientation tag (1-8), as
    ``PIL.ImageOps.exif_transpose`` turns a picture; other values leave it as it is."""
    h, w = image.dim() - 2, image.dim() - 1
    if orientation == 2:
        return image.flip(w)
    if orientation == 3:
        return image.flip(h, w)
    if orientation == 4:
        return image.flip(h)
    if orientation == 5:  # PIL's TRANSPOSE
        return image.transpose(h, w)
    if orientation == 6:  # PIL's ROTATE_270: a quarter turn clockwise
        return torch.rot90(image, -1, dims=(h, w))
    if orientation == 7:  # PIL's TRANSVERSE
        return image.transpose(h, w).flip(h, w)
    if orientation == 8:  # PIL's ROTATE_90: a quarter turn counterclockwise
        return torch.rot90(image, 1, dims=(h, w))
    return image


@dataclass
class RawJpeg:
    """A JPEG file's bytes (1-D uint8) and its EXIF orientation (1 when not applied)."""

    data: torch.Tensor
    orientation: int = 1


def jpeg_orientation(data: bytes) -> int | None:
    """The EXIF orientation of a JPEG from its header (1 without a tag); None when PIL cannot
    open the file (the CPU path then decides, so the file fails with the CPU path's reason)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - any header PIL rejects goes to the CPU path
        return None


class JpegPassthroughDataset(DecodeDataset):
    """:class:`DecodeDataset` that hands JPEG files over undecoded: item ``i`` is
    ``(i, image, error, seconds)`` where ``image`` is a :class:`RawJpeg` for a JPEG file and the
    preprocessed tensor for anything else (decoded here, in the worker)."""

    def __getitem__(self, i: int) -> tuple[int, Any, str | None, float]:
        start = time.perf_counter()
        try:
            data = read_image_bytes(self.items[i])
        except OSError as exc:
            return self.read_failure(i, exc, start)  # the CPU path's reason
        # Anything else is decoded here from the bytes already read (not read a second time).
        if not is_jpeg(data):
            return self.decode_item(i, data, start)
        orientation = jpeg_orientation(data)
        if orientation is None or not jpeg_is_complete(data):
            return self.decode_item(i, data, start)
        raw = RawJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), orientation if self.exif_transpose else 1)
        return i, raw, None, time.perf_counter() - start


@dataclass
class SplitBatch:
    """A batch whose non-JPEG images the workers decoded, and whose JPEG files wait for the device."""

    decoded: DecodedBatch
    jpeg_positions: list[int]  # dataset indices of the JPEG files, in order
    jpegs: list[RawJpeg]

    def pin_memory(self) -> SplitBatch:
        self.decoded.pin_memory()
        return self


def collate_passthrough(samples: list[tuple[int, Any, str | None, float]]) -> SplitBatch:
    """Collate :class:`JpegPassthroughDataset` items into a :class:`SplitBatch`."""
    from deltakern.data.images import collate_decoded

    raw = [s for s in samples if isinstance(s[1], RawJpeg)]
    rest = [s for s in samples if not isinstance(s[1], RawJpeg)]
    decoded = collate_decoded(rest) if rest else DecodedBatch(torch.empty(0, dtype=torch.int64), None, [], 0.0)
    decoded.decode_s += sum(s[3] for s in raw)
    return SplitBatch(decoded, [s[0] for s in raw], [s[1] for s in raw])


def decode_jpegs(blobs: Sequence[torch.Tensor], device: torch.device, *, decode: Callable | None = None) -> list[torch.Tensor | None]:
    """Decode JPEG bytes to uint8 RGB ``[3, H, W]`` on ``device`` as stored (no EXIF
    orientation): one batched call, and when that fails one call per file; None for each file
    the decoder refuses. ``decode`` replaces ``torchvision.io.decode_jpeg`` (tests)."""
    import warnings

    from torchvision.io import ImageReadMode

    if decode is None:
        from torchvision.io import decode_jpeg as decode

    def run(batch: list[torch.Tensor]) -> list[torch.Tensor]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's notice about its image decoders moving
            return list(decode(batch, mode=ImageReadMode.RGB, device=device))

    if not blobs:
        return []
    try:
        return run(list(blobs))  # type: ignore[return-value]
    except (RuntimeError, ValueError):  # one file spoils the batch: find out which
        results: list[torch.Tensor | None] = []
        for blob in blobs:
            try:
                results.append(run([blob])[0])
            except (RuntimeError, ValueError):
                results.append(None)
        return results


def finish_batch(
    batch: SplitBatch,
    device: torch.device,
    tensor_preprocess: Callable[[torch.Tensor], torch.Tensor],
    cpu_preprocess: Callable,
    *,
    exif_transpose: bool = True,
    decode: Callable | None = None,
) -> DecodedBatch:
    """The whole batch decoded and preprocessed on ``device``, in dataset order: the workers'
    images, the JPEGs the device decoded, and the JPEGs it refused decoded on the CPU (a file
    that fails there too is a failed image with the CPU decoder's reason)."""
    start = time.perf_counter()
    done: list[tuple[int, torch.Tensor]] = []
    failed = list(batch.decoded.failed)
    if batch.decoded.images is not None:
        images = batch.decoded.images.to(device, non_blocking=True)
        done.extend(zip(batch.decoded.positions.tolist(), images, strict=True))
    decoded = decode_jpegs([j.data for j in batch.jpegs], device, decode=decode)
    for position, jpeg, image in zip(batch.jpeg_positions, batch.jpegs, decoded, strict=True):
        if image is not None:
            done.append((position, tensor_preprocess(orient(image, jpeg.orientation))))
            continue
        try:  # the device refused it: the CPU decoder decides
            rgb = decode_image(jpeg.data.numpy().tobytes(), exif_transpose=exif_transpose)
        except ImageDecodeError as exc:
            failed.append((position, str(exc)))
            continue
        done.append((position, cpu_preprocess(rgb).to(device)))
    done.sort(key=lambda pair: pair[0])
    failed.sort()
    return DecodedBatch(
        positions=torch.tensor([p for p, _ in done], dtype=torch.int64),
        images=torch.stack([t for _, t in done]) if done else None,
        failed=failed,
        decode_s=batch.decoded.decode_s + (time.perf_counter() - start),
    )


__all__ = [
    "JpegPassthroughDataset", "RawJpeg", "SplitBatch", "TensorPreprocess", "collate_passthrough", "decode_jpegs",
    "finish_batch", "is_jpeg", "jpeg_is_complete", "jpeg_orientation", "orient",
]
