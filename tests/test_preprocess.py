"""The one-pass image transform (deltakern.clip.preprocess): bit for bit the model's own transform
on every image shape, both of PIL's pass orders, the fallbacks, the opt-out, and the op's checks.

The reference is the model's transform itself (torchvision on a PIL image): the op reproduces
PIL's integer resampling exactly, so the comparison is torch.equal, not a tolerance
(docs/conventions.md §3.5).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")
from PIL import Image  # noqa: E402
from torchvision import transforms as T  # noqa: E402

from deltakern.clip import preprocess as pp  # noqa: E402
from deltakern.core.errors import InvalidArgument  # noqa: E402
from deltakern.ops import extension, registry  # noqa: E402

needs_ext = pytest.mark.skipif(not extension.available(), reason="compiled extension not built")

# Shapes (height, width): landscape and portrait photos, tall images whose height shrinks most
# (Pillow 13 resamples their rows first), upscaling, one pixel, exact input size, extreme aspects.
SHAPES = [(375, 500), (500, 375), (897, 238), (1500, 2000), (2000, 1500), (150, 170), (1, 1), (224, 224),
          (224, 500), (223, 224), (3, 900), (900, 3), (2049, 225), (231, 229), (301, 1203)]


def noise(height: int, width: int, seed: int = 0) -> Image.Image:
    """Uniform noise: every pixel's rounding shows."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def random_shapes(n: int, seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    return [(int(h), int(w)) for h, w in rng.integers(1, 1300, (n, 2))]


CLIP_TRANSFORMS = {
    "bicubic": lambda: open_clip.image_transform(224, is_train=False),
    "bilinear": lambda: open_clip.image_transform(224, is_train=False, interpolation="bilinear"),
    "squash": lambda: open_clip.image_transform(224, is_train=False, resize_mode="squash"),
    "resize256_crop224": lambda: T.Compose([
        T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ]),
    "odd_sizes": lambda: T.Compose([
        T.Resize((97, 131), interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop((61, 88)), T.ToTensor(),
        T.Normalize((0.5, 0.25, 0.125), (0.3, 0.2, 0.1)),
    ]),
}


@needs_ext
@pytest.mark.parametrize("name", sorted(CLIP_TRANSFORMS))
def test_one_pass_equals_the_model_transform_bit_for_bit(name):
    transform = CLIP_TRANSFORMS[name]()
    fast = pp.one_pass_transform(transform)
    assert isinstance(fast, pp.OnePassTransform), fast
    for i, (h, w) in enumerate(SHAPES + random_shapes(25, seed=len(name))):
        image = noise(h, w, seed=i)
        want, got = transform(image), fast(image)
        assert got.dtype == want.dtype and got.shape == want.shape, (h, w)
        assert torch.equal(got, want), ((h, w), (got - want).abs().max())


@needs_ext
def test_the_portable_code_gives_the_same_bits():
    # ATEN_CPU_CAPABILITY=default turns the AVX2 passes off (as for every CPU kernel).
    script = (
        "import sys, torch, numpy as np, open_clip\n"
        "from PIL import Image\n"
        "from deltakern.clip.preprocess import one_pass_transform, OnePassTransform\n"
        "t = open_clip.image_transform(224, is_train=False)\n"
        "f = one_pass_transform(t)\n"
        "assert isinstance(f, OnePassTransform)\n"
        "rng = np.random.default_rng(1)\n"
        "for h, w in [(375, 500), (500, 375), (897, 238), (150, 170), (1, 1), (2049, 225)]:\n"
        "    im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))\n"
        "    assert torch.equal(f(im), t(im)), (h, w)\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def classic_pillow_resize(self, size, resample=None, box=None, reducing_gap=None):
    """PIL's resize as Pillow up to 12 ran it: the horizontal pass first, then the vertical one
    (each single-axis resize runs exactly one pass)."""
    width, height = size
    image = self
    if width != self.size[0]:
        image = ORIGINAL_RESIZE(image, (width, image.size[1]), resample)
    if height != image.size[1]:
        image = ORIGINAL_RESIZE(image, (width, height), resample)
    return image.copy() if image is self else image


ORIGINAL_RESIZE = Image.Image.resize


@needs_ext
def test_the_pass_order_follows_the_installed_pillow(monkeypatch):
    transform = CLIP_TRANSFORMS["bicubic"]()
    pillow_major = int(Image.__version__.split(".")[0])
    assert pp.one_pass_transform(transform).pass_order == ("pillow13" if pillow_major >= 13 else "horizontal_first")
    # A Pillow that always starts with the horizontal pass: the probe picks that order, and the
    # result matches it on the images where the two orders differ (tall ones).
    monkeypatch.setattr(Image.Image, "resize", classic_pillow_resize)
    fast = pp.one_pass_transform(transform)
    assert isinstance(fast, pp.OnePassTransform) and fast.pass_order == "horizontal_first"
    for h, w in [(897, 238), (2049, 225), (375, 500)]:
        image = noise(h, w)
        assert torch.equal(fast(image), transform(image)), (h, w)


@needs_ext
def test_a_resize_no_order_reproduces_keeps_the_model_transform(monkeypatch):
    def brighter(self, size, resample=None, box=None, reducing_gap=None):
        out = ORIGINAL_RESIZE(self, size, resample)
        return Image.eval(out, lambda v: min(v + 1, 255))

    transform = CLIP_TRANSFORMS["bicubic"]()
    monkeypatch.setattr(Image.Image, "resize", brighter)
    assert pp.one_pass_transform(transform) is transform


def test_unrecognised_transforms_are_returned_as_they_are():
    base = [T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)]
    transforms = [
        open_clip.image_transform(224, is_train=False, resize_mode="longest"),  # ResizeKeepRatio
        T.Compose([T.Resize(224, interpolation=T.InterpolationMode.NEAREST), T.CenterCrop(224), *base]),
        T.Compose([T.Resize(224, max_size=300), T.CenterCrop(224), *base]),
        T.Compose([T.Resize(224), T.CenterCrop(224), T.Grayscale(3), *base]),
        T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(), T.Normalize((0.5,), (0.5,))]),
        T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor()]),
        lambda image: T.functional.to_tensor(image),
    ]
    for transform in transforms:
        assert pp.one_pass_transform(transform) is transform, transform


@needs_ext
def test_images_the_op_does_not_cover_go_through_the_model_transform(monkeypatch):
    transform = T.Compose([
        T.Resize(200, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
        T.Normalize((0.5,) * 3, (0.25,) * 3),
    ])  # a crop larger than the resized image: torchvision pads
    fast = pp.one_pass_transform(transform)
    clip = CLIP_TRANSFORMS["bicubic"]()
    fast_clip = pp.one_pass_transform(clip)
    assert isinstance(fast, pp.OnePassTransform) and isinstance(fast_clip, pp.OnePassTransform)
    calls = []
    monkeypatch.setattr(registry, "resample_crop_normalize", lambda *a, **k: calls.append(1))
    padded = noise(300, 400)
    assert torch.equal(fast(padded), transform(padded)) and not calls
    grey = noise(260, 300).convert("L")  # not RGB: the model's transform converts it itself
    assert torch.equal(fast_clip(grey), clip(grey)) and not calls


@needs_ext
def test_the_caller_image_is_left_alone_and_the_transform_pickles():
    fast = pp.one_pass_transform(CLIP_TRANSFORMS["bicubic"]())
    image = noise(375, 500)
    before = np.array(image)
    fast(image)
    assert np.array_equal(np.array(image), before)
    again = pickle.loads(pickle.dumps(fast))  # spawned DataLoader workers receive it pickled
    assert torch.equal(again(image), fast(image))


def test_opt_out_and_a_bad_value(monkeypatch):
    transform = CLIP_TRANSFORMS["bicubic"]()
    monkeypatch.setenv(pp.ONE_PASS_ENV, "0")
    assert pp.one_pass_transform(transform) is transform
    assert pp.one_pass_status() == f"the model's transform ({pp.ONE_PASS_ENV}=0)"
    monkeypatch.setenv(pp.ONE_PASS_ENV, "fast")
    with pytest.raises(InvalidArgument, match=pp.ONE_PASS_ENV):
        pp.one_pass_transform(transform)
    assert pp.one_pass_status().startswith("error: ") and pp.ONE_PASS_ENV in pp.one_pass_status()


def test_without_the_extension_the_model_transform_runs(monkeypatch):
    monkeypatch.delenv(pp.ONE_PASS_ENV, raising=False)
    monkeypatch.setattr(registry, "has_kernel", lambda op, key: False)
    transform = CLIP_TRANSFORMS["bicubic"]()
    assert pp.one_pass_transform(transform) is transform
    assert pp.one_pass_status() == "the model's transform (the compiled op is unavailable)"


@needs_ext
def test_status_names_the_pass_order(monkeypatch):
    monkeypatch.delenv(pp.ONE_PASS_ENV, raising=False)
    order = pp.one_pass_transform(CLIP_TRANSFORMS["bicubic"]()).pass_order
    assert pp.one_pass_status() == f"one pass ({order} pass order, checked against the model's transform)"


def test_probe_shapes_take_both_orders():
    for size in [(224,), (336,), (97, 131), (32,)]:
        orders = set()
        for h, w in pp.probe_shapes(size):
            nh, nw = pp.resized_size(h, w, size)
            assert nh != h and nw != w, (size, h, w)  # both passes run
            orders.add(pp.vertical_pass_first("pillow13", h, w, nh, nw))
        assert orders == {True, False}, size


@needs_ext
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image": torch.zeros(4, 5, 3, dtype=torch.float32)}, "uint8"),
        ({"image": torch.zeros(4, 5, 4, dtype=torch.uint8)}, r"\[H, W, 3\]"),
        ({"size": (0, 5)}, "positive"),
        ({"crop": (5, 0, 4, 4)}, "inside"),
        ({"crop": (0, 0, 9, 4)}, "inside"),
        ({"filter": "nearest"}, "bicubic"),
        ({"std": [1.0, 0.0, 1.0]}, "std"),
        ({"mean": [0.0, 0.0]}, "3 values"),
    ],
)
def test_op_checks_its_arguments(kwargs, message):
    args = {"image": torch.zeros(6, 7, 3, dtype=torch.uint8), "size": (8, 8), "crop": (0, 0, 8, 8),
            "filter": "bicubic", "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], **kwargs}
    image, size, crop = args.pop("image"), args.pop("size"), args.pop("crop")
    with pytest.raises(RuntimeError, match=message):
        registry.resample_crop_normalize(image, size, crop, vertical_first=False, **args)


@needs_ext
def test_opcheck():
    assert registry.ensure_registered()
    image = torch.randint(0, 256, (37, 53, 3), dtype=torch.uint8)
    for vertical_first in (False, True):
        torch.library.opcheck(
            torch.ops.deltakern.resample_crop_normalize.default,
            (image, 30, 40, 3, 5, 21, 29, "bicubic", vertical_first, [0.5, 0.4, 0.3], [0.2, 0.3, 0.4]),
        )
