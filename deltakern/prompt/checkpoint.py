"""Prompt checkpoints: save and load (atomically), rebuild a learner or the class embeddings from
one, export class embeddings as ``.npy``."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deltakern.core.errors import InputNotFound, InvalidArgument
from deltakern.data.atomic import atomic_path
from deltakern.prompt.learner import PromptLearner, _text_tower

CHECKPOINT_FORMAT = "deltakern-prompts"
CHECKPOINT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, checkpoint: dict[str, Any]) -> None:
    """Write a prompt checkpoint atomically (``torch.save`` format; see :func:`train` for keys)."""
    if not isinstance(checkpoint, dict) or "ctx" not in checkpoint or "classnames" not in checkpoint:
        raise InvalidArgument("checkpoint must be a dict with at least 'ctx' and 'classnames'")
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **checkpoint}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain Python only)."""
    if not os.path.isfile(path):
        raise InputNotFound(f"prompt checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise InvalidArgument(f"path {str(path)!r} is not a deltakern prompt checkpoint (format {CHECKPOINT_FORMAT!r})")
    if checkpoint.get("version", 0) > CHECKPOINT_VERSION:
        raise InvalidArgument(
            f"checkpoint {str(path)!r} has version {checkpoint['version']}; this deltakern reads up to "
            f"{CHECKPOINT_VERSION}"
        )
    return checkpoint


def learner_from_checkpoint(
    checkpoint: dict[str, Any] | str | os.PathLike,
    model: nn.Module,
    tokenizer: Callable | None = None,
    *,
    freeze: bool = True,
) -> PromptLearner:
    """A :class:`PromptLearner` on ``model`` holding a checkpoint's context vectors."""
    if not isinstance(checkpoint, dict):
        checkpoint = load_checkpoint(checkpoint)
    ctx = checkpoint["ctx"]
    settings = checkpoint.get("settings", {})
    _, embedding = _text_tower(model)
    if embedding.weight.shape[1] != ctx.shape[1]:
        raise InvalidArgument(
            f"model's text width {embedding.weight.shape[1]} does not match the checkpoint's context width "
            f"{ctx.shape[1]} (trained with model {settings.get('model')!r}); load the model it was trained with"
        )
    learner = PromptLearner(
        model,
        checkpoint["classnames"],
        n_ctx=ctx.shape[0],
        init=None,
        class_token_position=settings.get("class_token_position", "end"),
        tokenizer=tokenizer,
        freeze=freeze,
    )
    with torch.no_grad():
        learner.ctx.copy_(ctx.to(learner.ctx.device, learner.ctx.dtype))
    return learner


def class_embeddings_from_checkpoint(
    path: str | os.PathLike, model: nn.Module, tokenizer: Callable, device: torch.device | str
) -> torch.Tensor:
    """L2-normalised float32 class embeddings ``[K, D]`` on ``device`` from a prompt checkpoint.

    ``model`` and ``tokenizer`` must be the open_clip model (and its tokenizer) the checkpoint was
    trained with; the model is left as it was (parameters' ``requires_grad`` and train/eval mode).
    """
    device = torch.device(device)
    learner = learner_from_checkpoint(path, model, tokenizer, freeze=False)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            embeddings = learner.class_embeddings()
    finally:
        model.train(was_training)
    return embeddings.to(device)


def export_class_embeddings(path: str | os.PathLike, embeddings: torch.Tensor) -> None:
    """Write class embeddings ``[K, D]`` as float32 ``.npy`` atomically (the format of eval's ``--classes``)."""
    import numpy as np

    array = embeddings.detach().to("cpu", torch.float32).numpy()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
