"""Few-shot training data: ``shots`` images per class from a folder-per-class dataset, CoOp's
training augmentation, and frozen image features for the cached-features mode."""

from __future__ import annotations

import math
import os
import random
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

from deltakern.core.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from deltakern.core.errors import InputNotFound, InvalidArgument
from deltakern.core.validation import check_int_range
from deltakern.data.images import IMAGE_EXTENSIONS
from deltakern.data.text import read_lines
from deltakern.runtime import Runtime, autocast


def few_shot_samples(
    root: str | os.PathLike,
    shots: int,
    *,
    seed: int = 0,
    classnames_file: str | os.PathLike | None = None,
) -> tuple[list[tuple[str, int]], list[str]]:
    """``(samples, classnames)`` from a folder-per-class dataset (ImageFolder layout).

    Classes are the sub-folders in sorted order; their names are the folder names with ``_``
    read as a space, or the lines of ``classnames_file`` in that same order. ``shots`` images per
    class are drawn without replacement by ``random.Random(seed)`` (``shots=0``: every image); a
    class with fewer images keeps all of them, with a warning. ``samples`` are ``(path, label)``.
    """
    from torchvision.datasets import ImageFolder

    check_int_range("shots", shots, 0, 10**9)
    if not os.path.isdir(root):
        raise InputNotFound(f"training folder not found: {root}")
    folder = ImageFolder(str(root), is_valid_file=lambda p: os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS)
    if classnames_file is not None:
        names = read_lines(classnames_file, name="classnames_file")
        if len(names) != len(folder.classes):
            raise InvalidArgument(
                f"classnames file {str(classnames_file)!r} must have one name per class folder "
                f"({len(folder.classes)}), got {len(names)} names"
            )
    else:
        names = [c.replace("_", " ") for c in folder.classes]
    by_class: dict[int, list[str]] = {k: [] for k in range(len(folder.classes))}
    for path, label in folder.samples:
        by_class[label].append(path)
    rng = random.Random(seed)
    samples: list[tuple[str, int]] = []
    for label, paths in by_class.items():
        if shots and len(paths) > shots:
            paths = sorted(rng.sample(paths, shots))
        elif shots and len(paths) < shots:
            warnings.warn(
                f"class {folder.classes[label]!r} has {len(paths)} images, fewer than shots={shots}; using all",
                stacklevel=2,
            )
        samples.extend((p, label) for p in paths)
    return samples, names


class _ImageSamples(torch.utils.data.Dataset):
    """``(path, label)`` samples decoded with PIL and transformed in the DataLoader workers."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from torchvision.datasets.folder import default_loader

        path, label = self.samples[index]
        return self.transform(default_loader(path)), label


def augment_transform(model: nn.Module) -> Callable:
    """Training augmentation: random resized crop (scale 0.08-1) + horizontal flip + the model's
    normalisation, at the model's input size and interpolation (CoOp's recipe)."""
    from torchvision import transforms as T

    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    mean = cfg.get("mean", OPENAI_CLIP_MEAN)
    std = cfg.get("std", OPENAI_CLIP_STD)
    mode = T.InterpolationMode.BILINEAR if cfg.get("interpolation") == "bilinear" else T.InterpolationMode.BICUBIC
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=mode),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


@torch.no_grad()
def encode_images(
    model: nn.Module,
    samples: Sequence[tuple[str, int]],
    transform: Callable,
    *,
    device: torch.device,
    batch_size: int = 64,
    workers: int = 0,
    precision: str = "fp32",
    progress: bool = True,
    runtime: Runtime | None = None,
) -> torch.Tensor:
    """Frozen image features ``[N, D]`` (float32, CPU) of ``samples`` in order, without augmentation.

    With a multi-process ``runtime`` (torchrun) each rank encodes every ``world_size``-th image
    and the parts are all-gathered.
    """
    from tqdm.auto import tqdm

    rt = runtime or Runtime(device=device, precision=precision)
    mine = list(range(rt.rank, len(samples), rt.world_size))
    loader = torch.utils.data.DataLoader(
        _ImageSamples([samples[i] for i in mine], transform), batch_size=batch_size, shuffle=False, num_workers=workers
    )
    parts = []
    for images, _ in tqdm(loader, desc="encoding images", disable=not (progress and rt.main), leave=False):
        with autocast(device, precision):
            parts.append(model.encode_image(images.to(device, non_blocking=True)).float())
    dim = int(model.visual.output_dim)
    local = torch.cat(parts) if parts else torch.empty(0, dim, device=device)
    if rt.world_size == 1:
        return local.cpu()
    import torch.distributed as dist

    per_rank = math.ceil(len(samples) / rt.world_size)
    padded = torch.zeros(per_rank, dim, device=device)
    padded[: len(local)] = local
    gathered = [torch.empty_like(padded) for _ in range(rt.world_size)]
    dist.all_gather(gathered, padded)
    features = torch.empty(len(samples), dim)
    for r, part in enumerate(gathered):
        rows = list(range(r, len(samples), rt.world_size))
        features[rows] = part[: len(rows)].cpu()
    return features
