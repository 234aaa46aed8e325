"""Image decoding (deltakern.data.images.decode_image and DecodeDataset): what a real photo folder
holds — 16-bit scans, rotated phone photos, CMYK JPEGs, transparent PNGs, animations, bombs and
files that are not images — becomes the right RGB picture or one stable, specific reason.

No models: decoding is tested on its own.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

Image = pytest.importorskip("PIL.Image")

from deltakern.data import images as data  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _images import asymmetric_rgb, encoded, make_bad_files  # noqa: E402


def rgb(data_bytes: bytes, **kwargs) -> np.ndarray:
    img = data.decode_image(data_bytes, **kwargs)
    assert img.mode == "RGB"
    return np.asarray(img)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_images_are_scaled_not_clipped(fmt):
    # A mid-grey 16-bit scan (PIL mode I;16): 8-bit conversion by clipping would make it white.
    levels = np.array([[0, 257 * 64, 32768, 65535]], dtype=np.uint16).repeat(3, axis=0)
    img = Image.fromarray(levels)
    assert img.mode == "I;16"
    out = rgb(encoded(img, fmt))
    np.testing.assert_array_equal(out[0, :, 0], [0, 64, 128, 255])
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_32_bit_integer_and_float_images():
    as_int = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32))  # mode I with 8-bit values
    np.testing.assert_array_equal(rgb(encoded(as_int, "TIFF"))[0, :, 0], [0, 100, 255])
    as_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))  # mode F in [0, 1]
    np.testing.assert_array_equal(rgb(encoded(as_float, "TIFF"))[0, :, 0], [0, 128, 255])


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize(
    "orientation, stored",
    [
        (3, lambda im: im.transpose(Image.Transpose.ROTATE_180)),
        (6, lambda im: im.transpose(Image.Transpose.ROTATE_90)),  # the usual portrait phone photo
        (8, lambda im: im.transpose(Image.Transpose.ROTATE_270)),
        (2, lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
    ],
)
def test_exif_orientation_is_applied(fmt, orientation, stored):
    upright = asymmetric_rgb(16, 32)
    exif = Image.Exif()
    exif[0x0112] = orientation
    rotated_file = encoded(stored(upright), fmt, exif=exif, **({"quality": 100} if fmt == "JPEG" else {}))
    expected = rgb(encoded(upright, fmt, quality=100) if fmt == "JPEG" else encoded(upright, fmt))
    got = rgb(rotated_file)
    assert got.shape == expected.shape
    if fmt == "JPEG":  # compression differs between the two stored layouts: compare 8x8 block means
        h, w = got.shape[0] // 8, got.shape[1] // 8
        got, expected = (a.reshape(h, 8, w, 8, 3).mean(axis=(1, 3)) for a in (got.astype(float), expected.astype(float)))
        assert np.abs(got - expected).max() <= 16
    else:
        np.testing.assert_array_equal(got, expected)
    # Turned off, the picture stays as stored.
    assert rgb(rotated_file, exif_transpose=False).shape == np.asarray(stored(upright)).shape


def test_cmyk_jpeg():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    out = rgb(encoded(cmyk, "JPEG", quality=95))
    assert np.abs(out.astype(int) - [255, 0, 0]).max() <= 8


def test_transparency_is_composited_on_white():
    # A palette PNG whose index 0 (red) is transparent: the transparent pixels come out white,
    # not as the palette colour behind them.
    pal = Image.new("P", (4, 2), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((3, 1), 1)
    out = rgb(encoded(pal, "PNG", transparency=0))
    assert (out[0, 0] == 255).all() and tuple(out[1, 3]) == (0, 0, 255)

    la = Image.fromarray(np.array([[[50, 255], [50, 0], [50, 128]]], dtype=np.uint8), mode="LA")
    out = rgb(encoded(la, "PNG"))
    assert tuple(out[0, 0]) == (50, 50, 50) and tuple(out[0, 1]) == (255, 255, 255)
    assert abs(int(out[0, 2, 0]) - round(50 * 128 / 255 + 255 * 127 / 255)) <= 1

    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert (rgb(encoded(rgba, "PNG")) == 255).all()


@pytest.mark.parametrize("fmt, kwargs", [("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {})])
def test_animated_images_give_their_first_frame(fmt, kwargs):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    blob = encoded(frames[0], fmt, save_all=True, append_images=frames[1:], **kwargs)
    with Image.open(__import__("io").BytesIO(blob)) as img:
        assert getattr(img, "n_frames", 1) == 3
    out = rgb(blob)
    assert np.abs(out.astype(int) - [255, 0, 0]).max() <= 2


def test_decompression_bomb_is_a_failed_image_without_warnings():
    # 100 million pixels (over PIL's 89.5 million limit) in a few kilobytes of PNG.
    bomb = encoded(Image.new("1", (10_000, 10_000)), "PNG")
    assert len(bomb) < 100_000
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(data.ImageDecodeError, match=r"^image too large: .*100000000 pixels.* limit of 89478485"):
            data.decode_image(bomb)
    assert caught == []


def test_decode_errors_are_specific_and_stable(tmp_path):
    expected = make_bad_files(tmp_path)
    items = [data.ImageItem(id=name, source=str(tmp_path / name)) for name in sorted(expected)]
    items.append(data.ImageItem(id="gone.jpg", source=str(tmp_path / "gone.jpg")))
    dataset = data.DecodeDataset(items, preprocess=lambda img: img)
    reasons = {}
    for i, item in enumerate(items):
        position, tensor, error, _ = dataset[i]
        assert position == i and tensor is None
        reasons[item.id] = error
    for name, start in expected.items():
        assert reasons[name].startswith(start), (name, reasons[name])
    assert reasons["empty.jpg"] == "empty file (0 bytes)"
    assert reasons["text.jpg"] == "not a recognised image format"
    assert reasons["gone.jpg"] == "cannot read file: No such file or directory"
    assert not any("0x" in r for r in reasons.values()), reasons
    # The same bytes give the same reason every time (no object addresses, no counters).
    assert [dataset[i][2] for i in range(len(items))] == [reasons[it.id] for it in items]


def test_decoding_rules_are_recorded():
    rules = data.decoding_rules()
    assert rules["exif_transpose"] is True and data.decoding_rules(exif_transpose=False)["exif_transpose"] is False
    assert {"high_bit_depth", "transparency", "frames", "too_large"} <= set(rules)


# -- JPEG draft (DCT-domain downscaling) ------------------------------------------------------------


def gradient_rgb(w: int, h: int):
    """A smooth picture (cheap to encode at any size)."""
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    a = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)), np.full((h, w, 1), 128.0)], axis=2)
    return Image.fromarray(a.astype(np.uint8))


def largest_draft_scale(w: int, h: int, side: int) -> int:
    """The largest JPEG DCT scale 1/s (s in 1, 2, 4, 8) with both sides >= ``side`` even before
    the decoder rounds the reduced size up (``w >= s * side``)."""
    return max(s for s in (1, 2, 4, 8) if w >= s * side and h >= s * side)


@pytest.mark.parametrize(
    "w, h",
    [(2000, 1500), (1500, 2000), (1000, 449), (449, 1000), (448, 448), (447, 900), (1792, 1793), (3000, 900), (300, 250)],
)
def test_jpeg_draft_keeps_both_sides_at_least_the_input_size(w, h):
    side = 224
    out = data.decode_image(encoded(gradient_rgb(w, h), "JPEG", quality=90), draft_size=side)
    s = largest_draft_scale(w, h, side)
    # Never below the input side (the model's resize and crop still do the last step), and the
    # most reduction that allows: ceil(w / s) x ceil(h / s).
    assert min(out.size) >= side
    assert out.size == (-(-w // s), -(-h // s)), (out.size, s)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP"])
def test_jpeg_draft_leaves_other_formats_untouched(fmt):
    blob = encoded(gradient_rgb(1200, 900), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    with Image.open(__import__("io").BytesIO(blob)) as img:
        assert data.request_jpeg_draft(img, 224) is False and img.size == (1200, 900)
    np.testing.assert_array_equal(rgb(blob, draft_size=224), rgb(blob))


def test_jpeg_draft_with_exif_rotation_gives_the_upright_picture():
    # A portrait photo (1000 wide, 2000 tall upright) stored turned, as phones do (orientation 6).
    upright = asymmetric_rgb(2000, 1000)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = encoded(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif)
    got = rgb(stored, draft_size=224)
    assert got.shape == (500, 250, 3)  # 1/4 scale (1/8 would make the short side 125), then rotated upright
    expected = np.asarray(upright.resize((250, 500), Image.Resampling.BOX)).astype(float)
    # Compare 10x10 block means: the draft's DCT scaling and BOX resampling differ at the edges only.
    blocks = lambda a: a.reshape(50, 10, 25, 10, 3).mean(axis=(1, 3))  # noqa: E731
    assert np.abs(blocks(got.astype(float)) - blocks(expected)).max() <= 12


def today_decode(blob: bytes) -> np.ndarray:
    """How images were decoded before the draft existed: full size, EXIF orientation, RGB."""
    import io

    from PIL import ImageOps

    with Image.open(io.BytesIO(blob)) as img:
        img.load()
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


def test_without_draft_decoding_is_unchanged(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8
    blobs = {
        "plain.jpg": encoded(gradient_rgb(1600, 1200), "JPEG", quality=90),
        "rotated.jpg": encoded(asymmetric_rgb(600, 900), "JPEG", quality=90, exif=exif),
        "small.jpg": encoded(gradient_rgb(100, 80), "JPEG"),
        "picture.png": encoded(gradient_rgb(700, 500), "PNG"),
    }
    items = []
    for name, blob in blobs.items():
        np.testing.assert_array_equal(rgb(blob), today_decode(blob))
        np.testing.assert_array_equal(rgb(blob, draft_size=None), today_decode(blob))
        (tmp_path / name).write_bytes(blob)
        items.append(data.ImageItem(id=name, source=str(tmp_path / name)))
    # The dataset without a draft size hands the transform the full-size picture.
    seen = []
    dataset = data.DecodeDataset(items, preprocess=lambda img: seen.append(np.asarray(img)) or len(seen))
    for i in range(len(items)):
        assert dataset[i][2] is None
    for got, blob in zip(seen, blobs.values(), strict=True):
        np.testing.assert_array_equal(got, today_decode(blob))


def test_dataset_passes_the_draft_size_to_the_decoder(tmp_path):
    (tmp_path / "big.jpg").write_bytes(encoded(gradient_rgb(1600, 1200), "JPEG", quality=90))
    items = [data.ImageItem(id="big.jpg", source=str(tmp_path / "big.jpg"))]
    sizes = [data.DecodeDataset(items, preprocess=lambda img: img.size, draft_size=d)[0][1] for d in (None, 224)]
    assert sizes == [(1600, 1200), (400, 300)]


def test_decoding_rules_name_the_draft_only_when_on():
    assert "jpeg_draft" not in data.decoding_rules()
    assert "DCT" in data.decoding_rules(jpeg_draft=True)["jpeg_draft"]


# -- GPU JPEG decoding: the selection and fallback logic (on the CPU), the device path (GPU) --------

from deltakern.data import gpu_jpeg  # noqa: E402

CLIP_CFG = {"size": (32, 32), "mode": "RGB", "mean": (0.48145466, 0.4578275, 0.40821073),
            "std": (0.26862954, 0.26130258, 0.27577711), "interpolation": "bicubic", "resize_mode": "shortest"}  # fmt: skip


def pil_preprocess(img):
    """The same transform as :data:`CLIP_CFG`, on PIL pictures (open_clip's CPU path)."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
        T.Normalize(CLIP_CFG["mean"], CLIP_CFG["std"]),
    ])(img)  # fmt: skip


def mixed_folder(root: Path) -> tuple[list, dict[str, bytes]]:
    """JPEGs (one stored rotated, one CMYK, three damaged), a PNG and a missing file."""
    exif = Image.Exif()
    exif[0x0112] = 6
    blobs = {
        "a.jpg": encoded(gradient_rgb(80, 60), "JPEG", quality=95),
        "b.png": encoded(gradient_rgb(70, 50), "PNG"),
        "c.jpg": encoded(asymmetric_rgb(48, 96).transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif),
        "d.jpg": encoded(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG", quality=95),
        "e.jpg": b"\xff\xd8\xff\xe0" + bytes(200),  # JPEG magic, no header PIL can read: the CPU path decides
    }
    truncated = encoded(Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)), "JPEG")
    # A readable header but cut short: nvJPEG would fill the missing part where PIL refuses, so it is
    # decoded (and refused) in the worker, never handed over.
    blobs["f.jpg"] = truncated[: len(truncated) // 2]
    # Complete, with a readable header and a bogus Huffman table: handed over, refused by every decoder.
    bogus = bytearray(truncated)
    table = bogus.find(b"\xff\xc4")  # DHT: marker, length (2 bytes), class/id, 16 code counts
    bogus[table + 5 : table + 21] = bytes([255] * 16)
    blobs["g.jpg"] = bytes(bogus)
    for name, blob in blobs.items():
        (root / name).write_bytes(blob)
    items = [data.ImageItem(id=name, source=str(root / name)) for name in [*blobs, "gone.jpg"]]
    return items, blobs


def test_passthrough_dataset_hands_jpegs_over_and_decodes_the_rest(tmp_path):
    items, blobs = mixed_folder(tmp_path)
    ds = gpu_jpeg.JpegPassthroughDataset(items, pil_preprocess)
    got = {items[i].id: ds[i] for i in range(len(items))}
    for name in ("a.jpg", "c.jpg", "d.jpg", "g.jpg"):  # by content: complete JPEGs with a readable header go to the device
        raw = got[name][1]
        assert isinstance(raw, gpu_jpeg.RawJpeg) and raw.data.numpy().tobytes() == blobs[name]
    cpu = data.DecodeDataset(items, pil_preprocess)
    assert got["e.jpg"][1] is None and got["e.jpg"][2] == cpu[4][2] == "not a recognised image format"
    assert got["f.jpg"][1] is None and got["f.jpg"][2] == cpu[5][2] and cpu[5][2].startswith("truncated JPEG")
    assert got["c.jpg"][1].orientation == 6 and got["a.jpg"][1].orientation == 1
    assert gpu_jpeg.JpegPassthroughDataset(items, pil_preprocess, exif_transpose=False)[2][1].orientation == 1
    assert got["b.png"][1].shape == (3, 32, 32)  # decoded and preprocessed in the worker
    assert got["gone.jpg"][1] is None and got["gone.jpg"][2] == "cannot read file: No such file or directory"


def test_orient_matches_pil_exif_transpose():
    from PIL import ImageOps

    picture = asymmetric_rgb(6, 10)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        with Image.open(__import__("io").BytesIO(encoded(picture, "PNG", exif=exif))) as stored:
            expected = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))
        got = gpu_jpeg.orient(torch.from_numpy(np.array(picture)).permute(2, 0, 1), orientation)
        np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), expected, err_msg=f"orientation {orientation}")


def decoded_batch(items, device="cpu", decode=None):
    ds = gpu_jpeg.JpegPassthroughDataset(items, pil_preprocess)
    batch = gpu_jpeg.collate_passthrough([ds[i] for i in range(len(items))])
    return gpu_jpeg.finish_batch(batch, torch.device(device), gpu_jpeg.TensorPreprocess.from_config(CLIP_CFG),
                                 pil_preprocess, decode=decode)  # fmt: skip


def test_finish_batch_keeps_order_and_falls_back_to_the_cpu(tmp_path):
    items, blobs = mixed_folder(tmp_path)
    calls = []

    def refusing_decoder(batch, **kwargs):
        # Like nvJPEG: a CMYK file spoils the batch it is in.
        calls.append(len(batch))
        if any(b.numpy().tobytes() == blobs["d.jpg"] for b in batch):
            raise RuntimeError("nvjpeg: unsupported JPEG")
        return gpu_jpeg.decode_jpegs(batch, torch.device("cpu"))

    out = decoded_batch(items, decode=refusing_decoder)
    assert calls == [4, 1, 1, 1, 1]  # the batch of 4 complete JPEGs, then one by one
    # Dataset order; the CMYK JPEG decoded on the CPU; the corrupt ones and the missing file fail
    # with the CPU path's reasons.
    assert out.positions.tolist() == [0, 1, 2, 3]
    failed = dict(out.failed)
    assert sorted(failed) == [4, 5, 6, 7] and failed[7] == "cannot read file: No such file or directory"
    cpu = data.DecodeDataset(items, pil_preprocess)
    assert failed[4] == cpu[4][2] and failed[5] == cpu[5][2] and failed[5].startswith("truncated JPEG")
    assert failed[6] == cpu[6][2] and failed[6].startswith("corrupt JPEG")
    for position in range(4):
        expected = cpu[position][1]
        # Worker-decoded and CPU fallback are the CPU path itself; torchvision's libjpeg may round
        # a pixel one grey level (1 / 255 / std, about 0.015) away from PIL's.
        tolerance = 0.0 if position in (1, 3) else 0.02
        assert (out.images[position] - expected).abs().max() <= tolerance, items[position].id
    assert out.images.shape == (4, 3, 32, 32)


def test_tensor_preprocess_matches_open_clip_transform():
    img = asymmetric_rgb(90, 140)
    tensor = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    got = gpu_jpeg.TensorPreprocess.from_config(CLIP_CFG)(tensor)
    expected = pil_preprocess(img)
    assert got.shape == expected.shape == (3, 32, 32)
    # On the CPU torchvision's uint8 antialiased bicubic resize reproduces PIL's; on the GPU it
    # runs in float and differs slightly (the gpu-marked test's tolerance).
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="gpu_decode supports"):
        gpu_jpeg.TensorPreprocess.from_config({**CLIP_CFG, "resize_mode": "squash"})


@pytest.mark.gpu
def test_gpu_decoding_matches_the_cpu_path(tmp_path):
    items, _ = mixed_folder(tmp_path)
    out = decoded_batch(items, device="cuda")
    assert out.images.device.type == "cuda" and out.positions.tolist() == [0, 1, 2, 3]
    cpu = data.DecodeDataset(items, pil_preprocess)
    # nvJPEG decodes a cut-short file by filling it in; the CPU path refuses it, and so must this one.
    assert dict(out.failed) == {i: cpu[i][2] for i in (4, 5, 6, 7)}
    for position in range(4):  # nvJPEG and the float resize on the GPU: close to the CPU path, not equal
        diff = (out.images[position].cpu() - cpu[position][1]).abs()
        assert diff.mean() <= 0.03 and diff.max() <= 0.5, (items[position].id, diff.mean(), diff.max())


def test_passthrough_dataset_reads_each_file_once(tmp_path, monkeypatch):
    items, _ = mixed_folder(tmp_path)
    reads = []

    def counting(read):
        def wrapper(item):
            reads.append(item.id)
            return read(item)
        return wrapper

    monkeypatch.setattr(data, "read_image_bytes", counting(data.read_image_bytes))
    monkeypatch.setattr(gpu_jpeg, "read_image_bytes", counting(gpu_jpeg.read_image_bytes))
    ds = gpu_jpeg.JpegPassthroughDataset(items, pil_preprocess)
    for i, item in enumerate(items):
        reads.clear()
        ds[i]
        assert reads == [item.id], (item.id, reads)  # a PNG, an unreadable JPEG or a missing file: once


def test_jpeg_is_complete_needs_an_end_marker_after_the_last_scan():
    picture = Image.fromarray(np.random.default_rng(2).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    for progressive in (False, True):
        # An end marker before the scans (as in an EXIF thumbnail; here in a comment) does not count.
        full = encoded(picture, "JPEG", quality=90, progressive=progressive, comment=b"thumb \xff\xd8 \xff\xd9")
        assert full.find(b"\xff\xd9") < full.find(b"\xff\xda")
        scans = [i for i in range(len(full) - 1) if full[i : i + 2] == b"\xff\xda"]
        assert len(scans) >= (2 if progressive else 1)
        assert gpu_jpeg.jpeg_is_complete(full)
        assert gpu_jpeg.jpeg_is_complete(full + b"camera trailer")  # bytes after the end marker
        # Cut anywhere from the first scan on (inside a scan or between two): incomplete.
        for cut in range(scans[0] + 2, len(full) - 1, 7):
            assert not gpu_jpeg.jpeg_is_complete(full[:cut]), (progressive, cut, len(full))


def _collated_in_shared_memory(samples):
    """collate_decoded as a DataLoader worker runs it; reports whether its batch is in shared memory."""
    batch = data.collate_decoded(samples)
    return batch.images.is_shared(), batch.images.clone()


def test_a_worker_stacks_the_batch_straight_into_shared_memory():
    # Otherwise the worker stacks the batch and then copies it into shared memory to send it.
    samples = [(i, torch.full((3, 4, 5), float(i)), None, 0.0) for i in range(3)]
    loader = torch.utils.data.DataLoader([samples], batch_size=None, num_workers=1, collate_fn=_collated_in_shared_memory)
    shared, images = next(iter(loader))
    assert shared
    assert torch.equal(images, torch.stack([s[1] for s in samples]))
    assert not data.collate_decoded(samples).images.is_shared()  # in the main process: a plain stack
