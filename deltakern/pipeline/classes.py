"""The class embeddings ``W [K, D]`` a score run uses: zero-shot from class names and templates
(cached), or from a prompt-tuning checkpoint."""

from __future__ import annotations

import os
from typing import Any

import torch

from deltakern.clip import zeroshot
from deltakern.clip.models import weights_identity
from deltakern.core.errors import InvalidArgument
from deltakern.data.text import read_lines
from deltakern.prompt.checkpoint import class_embeddings_from_checkpoint, load_checkpoint


def class_embeddings(
    clip: Any,
    *,
    classes: str | None = None,
    imagenet: bool = False,
    templates: str = "openai",
    prompts: str | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, list[str], dict[str, Any]]:
    """``(W [K, D] float32 on the model's device, class names, identity of W for run.json)``.

    Class names come from ``classes`` (a text file, one name per line) or ImageNet-1k.
    ``templates`` is a preset (``openai``, ``simple``, ``single``) or a text file with one
    template per line. With ``prompts`` (a prompt-tuning checkpoint of ``deltakern train``) the
    class embeddings come from the learned prompts instead, and class names are optional.
    """
    if classes is not None and imagenet:
        raise InvalidArgument("give either classes (a file of class names) or imagenet, not both", param="classes")
    names: list[str] | None = None
    if classes is not None:
        names = read_lines(classes, name="classes")
    elif imagenet:
        names = list(zeroshot.imagenet_classnames())
    if prompts is not None:
        W, saved_names = _prompt_class_embeddings(prompts, clip)
        names = names or saved_names or [f"class_{k}" for k in range(W.shape[0])]
        if len(names) != W.shape[0]:
            raise InvalidArgument(
                f"prompts {prompts} gives {W.shape[0]} classes but the class names list {len(names)}", param="prompts"
            )
        identity = {"prompts": weights_identity(prompts), "classnames_sha256": zeroshot.classnames_hash(names)}
        return W.float(), names, identity
    if names is None:
        raise InvalidArgument("class names are needed: give classes, imagenet or prompts", param="classes")
    template_list = (
        zeroshot.template_preset(templates) if templates in zeroshot.TEMPLATE_PRESETS else read_lines(templates, name="templates")
    )
    W = zeroshot.cached_class_embeddings(
        clip, names, template_list, cache_dir=cache_dir, seed=seed, autocast_dtype=autocast_dtype
    )
    identity = {
        "classnames_sha256": zeroshot.classnames_hash(names),
        "templates_sha256": zeroshot.templates_hash(template_list),
    }
    return W, names, identity


def _prompt_class_embeddings(path: str, clip: Any) -> tuple[torch.Tensor, list[str] | None]:
    """Class embeddings from a prompt checkpoint, and the class names it stores."""
    if not os.path.isfile(path):
        raise InvalidArgument(f"prompts must be a prompt-tuning checkpoint file, got {path!r} (no such file)", param="prompts")
    W = class_embeddings_from_checkpoint(path, clip.model, clip.tokenizer, clip.device)
    names = load_checkpoint(path).get("classnames")
    return W, list(names) if names else None
