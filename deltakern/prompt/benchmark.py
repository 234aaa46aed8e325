"""Prompt-tuning throughput: optimizer steps per second on synthetic images (used by
``deltakern bench`` and ``bench/bench_train.py``)."""

from __future__ import annotations

import time
from typing import Any

import torch

from deltakern.core.validation import check_int_range
from deltakern.loss import EBMLoss
from deltakern.prompt.learner import DEFAULT_INIT, PromptLearner
from deltakern.runtime import autocast, resolve_precision


def benchmark_steps(
    clip: Any,
    num_classes: int = 10,
    *,
    batch_size: int = 32,
    steps: int = 10,
    warmup_steps: int = 2,
    cache_image_features: bool = True,
    precision: str = "auto",
    seed: int = 0,
    init: str | None = DEFAULT_INIT,
    n_ctx: int | None = None,
    **loss_kwargs: Any,
) -> dict[str, Any]:
    """Optimizer steps per second of prompt tuning on synthetic images (one process).

    ``clip`` is a :class:`deltakern.clip.models.ClipModel`. A step is what :func:`train` does per
    batch: (without ``cache_image_features``) encode ``batch_size`` images with the frozen image
    tower, run the text tower over ``num_classes`` prompts, the EBM loss (``loss_kwargs``),
    backward and an SGD step; with ``cache_image_features`` the images are encoded once, before
    timing. Returns ``steps_per_second`` (median step), ``step_times`` (seconds) and the shape.
    """
    check_int_range("steps", steps, 1, 10**6)
    check_int_range("warmup_steps", warmup_steps, 0, 10**6)
    model = clip.model
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)
    learner = PromptLearner(
        model, [f"class {k}" for k in range(num_classes)], n_ctx=n_ctx, init=init, tokenizer=clip.tokenizer, seed=seed
    ).to(device)
    size = getattr(model.visual, "image_size", (224, 224))
    size = (size, size) if isinstance(size, int) else tuple(size)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, *size, generator=generator).to(device)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator).to(device)
    loss_fn = EBMLoss(**loss_kwargs)
    optimizer = torch.optim.SGD([learner.ctx], lr=0.002, momentum=0.9)
    cached = None
    if cache_image_features:
        with torch.no_grad(), autocast(device, precision):
            cached = model.encode_image(images).float()

    def step() -> None:
        if cached is None:
            with torch.no_grad(), autocast(device, precision):
                features = model.encode_image(images).float()
        else:
            features = cached
        with autocast(device, precision):
            class_features = learner()
        loss_fn(features, class_features.float(), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup_steps):
        step()
    sync()
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - began)
    median = sorted(times)[len(times) // 2]
    return {
        "steps_per_second": 1.0 / median,
        "step_times": times,
        "batch_size": batch_size,
        "num_classes": num_classes,
        "n_ctx": learner.n_ctx,
        "cache_image_features": cache_image_features,
        "precision": precision,
        "device": str(device),
    }
