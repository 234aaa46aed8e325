"""The model's inference transform in one compiled pass, bit for bit the same tensors.

open_clip's inference transform for a PIL image is ``Resize`` (shortest side, or both sides),
``CenterCrop``, an RGB conversion, ``ToTensor`` and ``Normalize``. On a CPU run the decode
worker shares the cores with the image encoder, and PIL's resize of every column of the resized
image plus the two float passes after it cost more than decoding the JPEG
(bench/RESULTS.md). :func:`one_pass_transform` recognises that transform and returns
:class:`OnePassTransform`, which resamples only the pixels the crop keeps with PIL's own
fixed-point arithmetic and writes the normalised tensor directly (the compiled op
``deltakern::resample_crop_normalize``); the result equals the transform's exactly, to the bit.

Exactness is checked, not assumed: PIL's two resampling passes each round to 8 bits, and their
order depends on the Pillow version (Pillow 13 runs the vertical pass first when the height
shrinks by more than twice as many pixels as the width; earlier versions always start with the
horizontal one). When built, the one-pass transform runs both itself and the model's transform on
probe images that tell the orders apart and picks the order that matches every probe; when none
does (another Pillow, another resampling), the compiled op is unavailable, or
``DELTAKERN_ONE_PASS_PREPROCESS=0``, the model's own transform is used. Images the op does not
cover (not RGB, smaller than the crop) always go through the model's transform.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deltakern.core.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from deltakern.core.errors import InvalidArgument
from deltakern.core.validation import env_switch
from deltakern.ops import registry

ONE_PASS_ENV = "DELTAKERN_ONE_PASS_PREPROCESS"

# The pass orders PIL has used; probed in this order.
PASS_ORDERS = ("pillow13", "horizontal_first")
_FILTERS = ("bicubic", "bilinear")  # torchvision's InterpolationMode values the op reproduces
_MAX_SIDE = 1 << 24  # the op's limit on a side (PIL's images are far smaller in practice)


def vertical_pass_first(order: str, height: int, width: int, new_height: int, new_width: int) -> bool:
    """True when PIL with the pass ``order`` resamples the rows (vertical pass) first."""
    if order == "pillow13":
        shrink = height - new_height
        return shrink > 0 and shrink > (width - new_width) * 2
    return False


def resized_size(height: int, width: int, size: Sequence[int]) -> tuple[int, int]:
    """torchvision's ``Resize(size)`` output (height, width): one value sets the short side (the
    long one scaled and truncated), two values set both."""
    if len(size) == 2:
        return int(size[0]), int(size[1])
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = int(size[0]), int(int(size[0]) * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


@dataclass(frozen=True)
class OnePassTransform:
    """Resize, center crop, ToTensor and Normalize of a PIL image in one compiled call.

    ``size`` is the ``Resize`` size (one value: the short side; two: height and width), ``crop``
    the ``CenterCrop`` (height, width) or None (no crop: open_clip's "squash" resize), ``filter``
    PIL's "bicubic" or "bilinear", ``pass_order`` one of :data:`PASS_ORDERS`. ``fallback`` (the model's transform) handles what the op does not:
    images that are not RGB, and resized images smaller than the crop (which torchvision pads).
    Picklable, so DataLoader workers can be spawned with it.
    """

    size: tuple[int, ...]
    crop: tuple[int, int] | None
    filter: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pass_order: str
    fallback: Callable[[Any], torch.Tensor]

    def __call__(self, image: Any) -> torch.Tensor:
        if getattr(image, "mode", None) != "RGB":
            return self.fallback(image)
        width, height = image.size
        new_height, new_width = resized_size(height, width, self.size)
        crop_height, crop_width = self.crop or (new_height, new_width)
        if crop_height > new_height or crop_width > new_width or max(new_height, new_width) >= _MAX_SIDE:
            return self.fallback(image)
        top = int(round((new_height - crop_height) / 2.0))  # torchvision's center_crop
        left = int(round((new_width - crop_width) / 2.0))
        pixels = torch.from_numpy(np.array(image))  # a writable copy: torch warns on read-only arrays
        return registry.resample_crop_normalize(
            pixels, (new_height, new_width), (top, left, crop_height, crop_width), filter=self.filter,
            vertical_first=vertical_pass_first(self.pass_order, height, width, new_height, new_width),
            mean=list(self.mean), std=list(self.std),
        )


def one_pass_transform(transform: Callable[[Any], torch.Tensor]) -> Callable[[Any], torch.Tensor]:
    """``transform`` as a :class:`OnePassTransform` when that gives the same tensors, else itself.

    Recognised: a torchvision ``Compose`` of ``Resize`` (bicubic or bilinear, no ``max_size``),
    optionally ``CenterCrop``, optionally an RGB conversion (open_clip's ``MaybeConvertMode("RGB")``
    or ``_convert_to_rgb``), ``ToTensor`` (or open_clip's ``MaybeToTensor``) and a 3-channel
    ``Normalize`` - open_clip's inference transform. The result must equal ``transform``'s on
    probe images, bit for bit (see the module docstring); anything else returns ``transform``, as
    does ``DELTAKERN_ONE_PASS_PREPROCESS=0``.
    """
    return _choose(transform)[0]


def one_pass_status() -> str:
    """What :func:`one_pass_transform` makes of CLIP's usual inference transform (224 pixels,
    bicubic, OpenAI's mean and std) here, in words (``deltakern env`` shows it); never raises."""
    try:
        from torchvision import transforms as T
    except ImportError:
        return "not available (torchvision is not installed)"
    clip_224 = T.Compose([
        T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
        T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    ])
    try:
        chosen, reason = _choose(clip_224)
    except InvalidArgument as exc:
        return f"error: {exc}"
    if isinstance(chosen, OnePassTransform):
        return f"one pass ({chosen.pass_order} pass order, checked against the model's transform)"
    return f"the model's transform ({reason})"


def _choose(transform: Callable[[Any], torch.Tensor]) -> tuple[Callable[[Any], torch.Tensor], str]:
    """The transform to run and, when it is ``transform`` itself, why."""
    if not env_switch(ONE_PASS_ENV):
        return transform, f"{ONE_PASS_ENV}=0"
    parts = _recognise(transform)
    if parts is None:
        return transform, "not a transform the one-pass op reproduces"
    if not registry.has_kernel("resample_crop_normalize", "CPU"):
        return transform, "the compiled op is unavailable"
    for order in PASS_ORDERS:
        candidate = OnePassTransform(**parts, pass_order=order, fallback=transform)
        if _agrees(candidate, transform):
            return candidate, ""
    return transform, "no pass order matches this Pillow's resize"


def _recognise(transform: Any) -> dict[str, Any] | None:
    """The parameters of an open_clip-style inference Compose, or None when it is anything else."""
    from torchvision import transforms as T

    steps = [s for s in transform.transforms if not _is_rgb_conversion(s)] if isinstance(transform, T.Compose) else []
    if len(steps) == 3:  # no crop
        steps.insert(1, None)
    if len(steps) != 4:
        return None
    resize, crop, to_tensor, normalize = steps
    if not (
        type(resize) is T.Resize and (crop is None or type(crop) is T.CenterCrop)
        and (type(to_tensor) is T.ToTensor or type(to_tensor).__name__ == "MaybeToTensor")
        and type(normalize) is T.Normalize
    ):
        return None
    size = _as_sizes(resize.size)
    crop_size = None if crop is None else _as_sizes(crop.size)
    if crop_size is not None and len(crop_size) == 1:
        crop_size = crop_size * 2
    mean, std = tuple(float(v) for v in normalize.mean), tuple(float(v) for v in normalize.std)
    if (
        getattr(resize.interpolation, "value", None) not in _FILTERS or resize.max_size is not None
        or resize.antialias is False or len(size) not in (1, 2) or (crop_size is not None and len(crop_size) != 2)
        or min(size + (crop_size or [])) < 1 or len(mean) != 3 or len(std) != 3 or 0.0 in std
    ):
        return None
    return {"size": tuple(size), "crop": None if crop_size is None else tuple(crop_size),
            "filter": resize.interpolation.value, "mean": mean, "std": std}


def _as_sizes(size: int | Sequence[int]) -> list[int]:
    """A torchvision size argument (an int or a sequence) as a list of ints."""
    return [int(size)] if isinstance(size, int) else [int(v) for v in size]


def _is_rgb_conversion(step: Any) -> bool:
    """open_clip's RGB conversion steps (a no-op on the RGB images the op takes)."""
    if type(step).__name__ == "MaybeConvertMode":
        return getattr(step, "mode", None) == "RGB"
    return getattr(step, "__name__", None) == "_convert_to_rgb" and "open_clip" in getattr(step, "__module__", "")


def probe_shapes(size: Sequence[int]) -> list[tuple[int, int]]:
    """(height, width) of the probe images for a ``Resize(size)``: each needs both passes, and
    together they take both of Pillow 13's orders (landscape and portrait shrinking, a tall image
    whose height shrinks most, upscaling), with odd and even crop margins."""
    height, width = (int(size[0]), int(size[0])) if len(size) == 1 else (int(size[0]), int(size[1]))
    return [
        (height * 5 // 3 + 1, width * 20 // 9 + 3),  # landscape, shrinking
        (height * 20 // 9 + 3, width * 5 // 3 + 1),  # portrait, shrinking
        (3 * (height + 7) + 5, width + 7),  # tall: the height shrinks by more than twice the width
        (height * 2 // 3 + 1, width * 3 // 4 + 2),  # upscaling
        (height + 7, width + 5),
    ]


def _agrees(candidate: OnePassTransform, transform: Callable[[Any], torch.Tensor]) -> bool:
    """True when ``candidate`` gives ``transform``'s tensors, bit for bit, on the probe images
    (uniform noise: every pixel's rounding counts)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for height, width in probe_shapes(candidate.size):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        want, got = transform(image), candidate(image)
        if not (isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor) and torch.equal(got, want)):
            return False
    return True
