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
