"""The settings of a pipeline run, one frozen object per job, checked when it is built.

``EncodeSettings`` and ``ScoreSettings`` share the run options (sharding, batching, device,
precision, torchrun backend) of :class:`RunOptions`. Errors name the field (``param``), never
a command-line flag: the command line maps fields to its flags.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

import torch

from deltakern.core.constants import BACKENDS, MATMUL_PRECISIONS, MODES, PRECISIONS
from deltakern.core.errors import InvalidArgument
from deltakern.core.validation import check_bool, check_choice, check_finite_number, check_int_range, check_positive

FEATURE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DIST_BACKENDS = ("gloo", "nccl")


def _optional_str(name: str, value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{name} must be a non-empty string or None, got {value!r}", param=name)
    return value


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """How a run is cut and executed (shared by encode and score)."""

    shard_size: int = 10_000
    batch_size: int = 256
    workers: int | None = None  # None: chosen with torch's threads from the cores (pipeline.parallelism)
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    dist_backend: str | None = None
    exif_transpose: bool = True  # apply the EXIF orientation tag of decoded images
    # Decode large JPEGs at a reduced DCT scale, never below the model's input size: on 2000x1500
    # photos 6.7x faster decoding, and a smaller embedding change than bf16 autocast makes
    # (bench/bench_image_path.py --part photos)
    jpeg_draft: bool = True
    gpu_decode: bool = False  # CUDA runs: decode JPEG files in batches with nvJPEG (deltakern.data.gpu_jpeg)

    def __post_init__(self) -> None:
        check_bool("exif_transpose", self.exif_transpose)
        check_bool("jpeg_draft", self.jpeg_draft)
        check_bool("gpu_decode", self.gpu_decode)
        check_int_range("shard_size", self.shard_size, 1, 1 << 40)
        check_int_range("batch_size", self.batch_size, 1, 1 << 20)
        if self.workers is not None:
            check_int_range("workers", self.workers, 0, 1024)
        check_int_range("seed", self.seed, 0, 2**63 - 1)
        check_choice("precision", self.precision, PRECISIONS)
        if not isinstance(self.device, str) or not self.device:
            raise InvalidArgument(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}", param="device")
        if self.dist_backend is not None:
            check_choice("dist_backend", self.dist_backend, DIST_BACKENDS)

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # normalising a frozen field once, at construction

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, kw_only=True)
class EncodeSettings(RunOptions):
    """``deltakern encode``: images -> L2-normalised feature shards in ``out`` (a directory)."""

    model: str
    pretrained: str
    images: str
    out: str
    dtype: str = "float16"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("model", "pretrained", "images", "out"):
            if _optional_str(name, getattr(self, name)) is None:
                raise InvalidArgument(f"{name} is required", param=name)
            self._set(name, _optional_str(name, getattr(self, name)))
        check_choice("dtype", self.dtype, FEATURE_DTYPES)


@dataclass(frozen=True, kw_only=True)
class ScoreSettings(RunOptions):
    """``deltakern score``: images (or an encode run's ``features``) -> one parquet row each.

    Exactly one of ``images`` and ``features``. Class embeddings come from ``classes`` (a text
    file of names) or ``imagenet`` with ``templates``, or from a prompt checkpoint ``prompts``.
    ``c``, ``temperature``, ``reset``, ``mode``, ``backend`` and ``matmul_precision`` are
    :func:`deltakern.score`'s.
    """

    out: str
    model: str | None = None
    pretrained: str | None = None
    images: str | None = None
    features: str | None = None
    classes: str | None = None
    imagenet: bool = False
    templates: str = "openai"
    prompts: str | None = None
    c: int = 1
    temperature: float = 0.01
    reset: float = 0.0
    mode: str = "separate"
    backend: str = "auto"
    matmul_precision: str = "highest"
    cache_dir: str | None = None
    # NegLabel: a vocabulary file to mine n_negative negative labels from, split into
    # negative_groups groups (docs/conventions.md §2.5); adds the parquet's neglabel column
    negative_labels: str | None = None
    n_negative: int = 10_000
    negative_groups: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("out", "model", "pretrained", "images", "features", "classes", "templates", "prompts", "cache_dir",
                     "negative_labels"):
            self._set(name, _optional_str(name, getattr(self, name)))
        if self.out is None:
            raise InvalidArgument("out is required (a path ending in .parquet)", param="out")
        if not self.out.endswith(".parquet"):
            raise InvalidArgument(f"out must be a path ending in .parquet, got {self.out!r}", param="out")
        if (self.images is None) == (self.features is None):
            raise InvalidArgument("give exactly one of images (an image source) or features (an encode run)", param="images")
        if self.images is not None and (self.model is None or self.pretrained is None):
            raise InvalidArgument("model and pretrained are required when scoring images", param="model" if self.model is None else "pretrained")
        check_bool("imagenet", self.imagenet)
        if self.classes is not None and self.imagenet:
            raise InvalidArgument("give either classes (a file of class names) or imagenet, not both", param="classes")
        if self.classes is None and not self.imagenet and self.prompts is None:
            raise InvalidArgument("class names are needed: give classes, imagenet or prompts", param="classes")
        if self.templates is None:
            raise InvalidArgument("templates must be a preset name or a file of templates", param="templates")
        check_int_range("c", self.c, 1, 1 << 20)
        self._set("temperature", check_positive("temperature", self.temperature))
        self._set("reset", check_finite_number("reset", self.reset))
        check_choice("mode", self.mode, MODES)
        check_choice("backend", self.backend, BACKENDS)
        check_choice("matmul_precision", self.matmul_precision, MATMUL_PRECISIONS)
        check_int_range("n_negative", self.n_negative, 1, 1 << 30)
        check_int_range("negative_groups", self.negative_groups, 1, self.n_negative)
