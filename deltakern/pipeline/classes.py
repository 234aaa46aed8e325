"""The class embeddings ``W [K, D]`` a score run uses: zero-shot from class names and templates
(cached), or from a prompt-tuning checkpoint.

Everything that can be read without the model (class names, templates, the checkpoint's class
list) is read first, by :func:`plan_classes`, so that a missing or empty file, or ``c`` larger
than the number of classes, fails before any weights are loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from deltakern.clip import zeroshot
from deltakern.clip.models import weights_identity
from deltakern.core.errors import DeltakernError, InvalidArgument
from deltakern.data.text import read_lines
from deltakern.prompt.checkpoint import class_embeddings_from_checkpoint, load_checkpoint


@dataclass(frozen=True)
class ClassPlan:
    """What a score run's classes will be, known before the model loads."""

    names: list[str]
    templates: list[str] | None  # None with prompts
    prompts: str | None
    identity: dict[str, Any]  # recorded in run.json

    @property
    def count(self) -> int:
        """K, the number of classes."""
        return len(self.names)


def plan_classes(
    *, classes: str | None = None, imagenet: bool = False, templates: str = "openai", prompts: str | None = None
) -> ClassPlan:
    """Read the class names, templates and prompt checkpoint's class list (no model needed).

    Class names come from ``classes`` (a text file, one name per line) or ImageNet-1k.
    ``templates`` is a preset (``openai``, ``simple``, ``single``) or a text file with one
    template per line. With ``prompts`` (a prompt-tuning checkpoint of ``deltakern train``) the
    class embeddings come from the learned prompts instead, and class names are optional.
    """
    if classes is not None and imagenet:
        raise InvalidArgument("give either classes (a file of class names) or imagenet, not both", param="classes")
    names: list[str] | None = None
    if classes is not None:
        names = _read(classes, "classes")
    elif imagenet:
        names = list(zeroshot.imagenet_classnames())
    if prompts is not None:
        saved = _checkpoint_classnames(prompts)
        if names is not None and saved is not None and len(names) != len(saved):
            raise InvalidArgument(
                f"prompts {prompts} gives {len(saved)} classes but the class names list {len(names)}", param="prompts"
            )
        names = names or saved
        if names is None:
            raise InvalidArgument(f"prompts {prompts} stores no class names; give classes or imagenet", param="prompts")
        identity = {"prompts": weights_identity(prompts), "classnames_sha256": zeroshot.classnames_hash(names)}
        return ClassPlan(names=names, templates=None, prompts=prompts, identity=identity)
    if names is None:
        raise InvalidArgument("class names are needed: give classes, imagenet or prompts", param="classes")
    template_list = (
        zeroshot.template_preset(templates) if templates in zeroshot.TEMPLATE_PRESETS else _read(templates, "templates")
    )
    identity = {
        "classnames_sha256": zeroshot.classnames_hash(names),
        "templates_sha256": zeroshot.templates_hash(template_list),
    }
    return ClassPlan(names=names, templates=template_list, prompts=None, identity=identity)


def class_embeddings(
    clip: Any,
    plan: ClassPlan,
    *,
    cache_dir: str | None = None,
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``W [K, D]`` float32 on the model's device for the classes of ``plan``."""
    if plan.prompts is not None:
        W = class_embeddings_from_checkpoint(plan.prompts, clip.model, clip.tokenizer, clip.device)
        if W.shape[0] != plan.count:
            raise InvalidArgument(
                f"prompts {plan.prompts} gives {W.shape[0]} classes but the class names list {plan.count}", param="prompts"
            )
        return W.float()
    return zeroshot.cached_class_embeddings(
        clip, plan.names, plan.templates, cache_dir=cache_dir, seed=seed, autocast_dtype=autocast_dtype
    )


@dataclass(frozen=True)
class NegativePlan:
    """The negative labels a score run will mine (NegLabel), checked before the model loads."""

    vocabulary: list[str]  # usable candidates: unique, without the ID class names
    templates: list[str]
    id_names: list[str]
    n_negative: int
    identity: dict[str, Any]  # recorded in run.json

    def cached(self, model: str, pretrained: str, *, cache_dir: str | None, seed: int,
               autocast_dtype: torch.dtype | None, device: torch.device | str):  # fmt: skip
        """The mined labels if ``model``/``pretrained`` already mined them under this autocast
        dtype (read from the cache without loading the model), else None."""
        from deltakern.clip.negatives import find_mined_negative_labels

        return find_mined_negative_labels(
            model, pretrained, self.id_names, self.vocabulary, self.n_negative, self.templates,
            cache_dir=cache_dir, seed=seed, autocast_dtype=autocast_dtype, device=device,
        )  # fmt: skip

    def mine(self, clip: Any, *, cache_dir: str | None, seed: int, autocast_dtype: torch.dtype | None):
        """The mined :class:`~deltakern.clip.negatives.NegativeLabels` (cached on disk)."""
        from deltakern.clip.negatives import mine_negative_labels

        return mine_negative_labels(
            clip, self.id_names, self.vocabulary, self.n_negative, self.templates,
            cache_dir=cache_dir, seed=seed, autocast_dtype=autocast_dtype,
        )  # fmt: skip


def plan_negatives(settings: Any, plan: ClassPlan) -> NegativePlan | None:
    """Read and check the negative-label vocabulary of a score run (None without one).

    The candidates are embedded with the run's templates (the ``templates`` setting when the
    classes come from a prompt checkpoint)."""
    if settings.negative_labels is None:
        return None
    import hashlib
    import json

    from deltakern.clip.negatives import read_vocabulary

    vocabulary = read_vocabulary(settings.negative_labels, plan.names)
    if settings.n_negative > len(vocabulary):
        raise InvalidArgument(
            f"n_negative={settings.n_negative} exceeds the {len(vocabulary)} usable entries of {settings.negative_labels} "
            "(after removing duplicates and the ID class names)",
            param="n_negative",
        )
    templates = plan.templates
    if templates is None:
        templates = list(
            zeroshot.template_preset(settings.templates)
            if settings.templates in zeroshot.TEMPLATE_PRESETS
            else _read(settings.templates, "templates")
        )
    identity = {
        "negative_labels_sha256": hashlib.sha256(json.dumps(vocabulary).encode("utf-8")).hexdigest(),
        "n_negative": settings.n_negative,
        "negative_groups": settings.negative_groups,
        "negative_templates_sha256": zeroshot.templates_hash(templates),
    }
    return NegativePlan(vocabulary, list(templates), list(plan.names), settings.n_negative, identity)


def _read(path: str, name: str) -> list[str]:
    try:
        return read_lines(path, name=name)
    except DeltakernError as exc:
        exc.param = exc.param or name
        raise


def _checkpoint_classnames(path: str) -> list[str] | None:
    """The class names a prompt checkpoint stores; a clear error when it cannot be read."""
    if not os.path.isfile(path):
        raise InvalidArgument(f"prompts must be a prompt-tuning checkpoint file, got {path!r} (no such file)", param="prompts")
    try:
        checkpoint = load_checkpoint(path)
    except DeltakernError as exc:
        raise InvalidArgument(f"prompts: {exc}", param="prompts") from None
    except Exception as exc:  # torch.load on a file that is not a checkpoint: pickle, zip or I/O errors
        # torch's messages run over many lines; the type says enough next to the file name
        raise InvalidArgument(
            f"prompts: cannot read {path!r} as a prompt-tuning checkpoint of `deltakern train` ({type(exc).__name__})",
            param="prompts",
        ) from None
    names = checkpoint.get("classnames")
    return [str(n) for n in names] if names else None
