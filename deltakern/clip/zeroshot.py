"""Zero-shot class embeddings ``W [K, D]`` from class names and prompt templates.

For each class, every template is filled in with the class name and encoded by the model's
text tower; each template's embedding is L2-normalised, the template embeddings are averaged,
and the average is renormalised (CLIP's prompt ensembling). Classes are encoded in batches.

Templates are strings with ``{}`` or ``{c}`` where the class name goes, or callables
``classname -> prompt``. Presets (:data:`TEMPLATE_PRESETS`): the 80 OpenAI ImageNet templates,
the 7-template subset, and a single ``"a photo of a {}."`` prompt; :func:`imagenet_classnames`
gives the 1000 ImageNet class names. All of them come from open_clip's metadata.

Built matrices can be cached on disk (:func:`cached_class_embeddings`), keyed by the model,
its weights, and hashes of the class names and of the rendered templates.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Union

import torch

from deltakern.core.errors import InvalidArgument, InvalidArgumentType
from deltakern.core.validation import check_bool, check_choice, check_classnames, check_int_range
from deltakern.data.atomic import atomic_path

Template = Union[str, Callable[[str], str]]
TEMPLATE_PRESETS = ("openai", "simple", "single")
SINGLE_TEMPLATE = ("a photo of a {}.",)
CACHE_VERSION = 1


def template_preset(name: str) -> tuple[Template, ...]:
    """The templates of a preset: ``"openai"`` (80), ``"simple"`` (7) or ``"single"`` (1)."""
    check_choice("templates", name, TEMPLATE_PRESETS)
    if name == "single":
        return SINGLE_TEMPLATE
    from open_clip import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    return tuple(OPENAI_IMAGENET_TEMPLATES if name == "openai" else SIMPLE_IMAGENET_TEMPLATES)


def imagenet_classnames() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names (open_clip's cleaned-up list), in label order."""
    from open_clip import IMAGENET_CLASSNAMES

    return tuple(IMAGENET_CLASSNAMES)


def render(template: Template, classname: str) -> str:
    """Fill ``classname`` into one template (``{}``, ``{c}`` or a callable)."""
    if callable(template):
        text = template(classname)
    elif isinstance(template, str):
        if "{}" not in template and "{c}" not in template:
            raise InvalidArgument(f"templates must contain '{{}}' or '{{c}}' where the class name goes, got {template!r}")
        text = template.replace("{c}", "{0}").format(classname)
    else:
        raise InvalidArgumentType(f"templates must be strings or callables, got {type(template).__name__}")
    if not isinstance(text, str):
        raise InvalidArgumentType(f"a template callable must return a str, got {type(text).__name__} for {classname!r}")
    return text


def _check_inputs(classnames: Sequence[str], templates: Sequence[Template]) -> None:
    check_classnames(classnames)
    if isinstance(templates, str) or len(templates) == 0:
        raise InvalidArgument(f"templates must be a non-empty sequence of strings or callables, got {templates!r:.80}")
    for t in templates:
        render(t, "x")  # type and placeholder check, one clear error up front


def build_class_embeddings(
    model: torch.nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[Template],
    *,
    device: torch.device | str | None = None,
    classes_per_batch: int = 32,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    truncate: bool = True,
) -> torch.Tensor:
    """The zero-shot class-embedding matrix ``[K, D]`` (float32, rows of unit norm).

    Each class's prompts (one per template) are encoded by ``model.encode_text``; the prompt
    embeddings are normalised, averaged and renormalised. ``classes_per_batch`` classes are
    encoded per forward pass; ``autocast_dtype`` (e.g. ``torch.bfloat16`` on GPU) runs the text
    tower under autocast. The result lives on ``device`` (default: the model's device).

    ``truncate`` (default True): where it is exact (:func:`truncating_text_encoder`), each batch
    runs the text transformer on its first L tokens only, L = the last end-of-text position in
    the batch + 1, instead of the full context (77 for CLIP); other towers use ``encode_text``.
    """
    from open_clip import build_zero_shot_classifier

    _check_inputs(classnames, templates)
    classes_per_batch = check_int_range("classes_per_batch", classes_per_batch, 1, 1 << 30)
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    # open_clip's builder does the batching and the normalise-average-renormalise; giving it
    # callables lets "{c}" templates through as well as "{}" ones.
    prompts = [functools.partial(render, t) for t in templates]
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    )
    with torch.inference_mode(), autocast:
        encoder = truncating_text_encoder(model) if check_bool("truncate", truncate) else None
        weights = build_zero_shot_classifier(
            encoder or model,
            tokenizer,
            list(classnames),
            prompts,
            num_classes_per_batch=classes_per_batch,
            device=device,
            use_tqdm=progress,
        )
    W = weights.T.float()
    # Renormalise in float32: under autocast the average was taken in reduced precision.
    return (W / torch.linalg.vector_norm(W, dim=1, keepdim=True)).contiguous()


# ----------------------------------------------------------------------------- text truncation


def _is_causal_mask(mask: torch.Tensor | None) -> bool:
    """True for open_clip's causal mask: -inf strictly above the diagonal, 0 elsewhere."""
    if mask is None or mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        return False
    above = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)
    return bool((torch.isneginf(mask) == above).all() and (mask[~above] == 0).all())


def _text_tower(model: torch.nn.Module) -> tuple[torch.nn.Module, str, int | None] | None:
    """``(tower, pool_type, eos_id)`` when ``model.encode_text`` is exactly open_clip's causal
    text transformer read at the end-of-text token, else None.

    Supported: ``open_clip.CLIP`` and ``open_clip.CustomTextCLIP`` with a ``TextTransformer``
    (exact classes, not subclasses, which may change the forward), a causal attention mask,
    ``argmax`` or ``eos`` pooling, no appended class token (CoCa) and no padding mask. A tower
    that attends to later tokens (no causal mask) or reads another position is not.
    """
    try:
        import open_clip
        from open_clip.transformer import TextTransformer
    except ImportError:
        return None
    if "encode_text" in vars(model):  # patched on the instance
        return None
    if type(model) is open_clip.CLIP:
        tower, pool, eos = model, model.text_pool_type, getattr(model, "text_eos_id", None)
    elif type(model) is open_clip.CustomTextCLIP and type(model.text) is TextTransformer:
        tower = model.text
        if tower.cls_emb is not None or tower.use_pad_mask or tower.output_tokens:
            return None
        pool, eos = tower.pool_type, tower.eos_id
    else:
        return None
    if pool not in ("argmax", "eos") or (pool == "eos" and eos is None):
        return None
    return (tower, pool, eos) if _is_causal_mask(tower.attn_mask) else None


class _TruncatingTextEncoder:
    """``encode_text`` of a causal text tower run on the first L tokens of a batch only.

    With a causal mask the state at position p depends on tokens 0..p alone, and the embedding
    is read at the end-of-text token, so the tokens after the batch's last end-of-text position
    (padding) change nothing: dropping them gives the same embedding up to floating-point
    summation order, for a fraction of the work (CLIP prompts use ~10 of 77 positions).
    """

    def __init__(self, tower: torch.nn.Module, pool: str, eos: int | None) -> None:
        self.tower, self.pool, self.eos = tower, pool, eos

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        t = self.tower
        ends = text.argmax(dim=-1) if self.pool == "argmax" else (text == self.eos).int().argmax(dim=-1)
        length = int(ends.max()) + 1 if text.shape[0] else text.shape[1]
        text = text[:, :length]
        cast_dtype = t.transformer.get_cast_dtype()
        x = t.token_embedding(text).to(cast_dtype) + t.positional_embedding[:length].to(cast_dtype)
        x = t.transformer(x, attn_mask=t.attn_mask[:length, :length])
        x = t.ln_final(x)
        x = text_global_pool(x, text, self.pool, eos_token_id=self.eos)
        if t.text_projection is not None:
            x = t.text_projection(x) if isinstance(t.text_projection, torch.nn.Linear) else x @ t.text_projection
        return torch.nn.functional.normalize(x, dim=-1) if normalize else x


def truncating_text_encoder(model: torch.nn.Module) -> _TruncatingTextEncoder | None:
    """An object whose ``encode_text(tokens, normalize=False)`` equals ``model.encode_text`` but
    runs the text transformer only up to the batch's last end-of-text token, or None when that is
    not exact for this tower (see :func:`_text_tower`; callers then use ``model.encode_text``)."""
    found = _text_tower(model)
    return None if found is None else _TruncatingTextEncoder(*found)


def classnames_hash(classnames: Sequence[str]) -> str:
    """SHA-256 of the class names in order."""
    return hashlib.sha256(json.dumps(list(classnames)).encode("utf-8")).hexdigest()


def templates_hash(templates: Sequence[Template]) -> str:
    """SHA-256 of the templates as rendered for a placeholder class name.

    Rendering (rather than hashing source text) treats ``"a {}."``, ``"a {c}."`` and
    ``lambda c: f"a {c}."`` as the same template, which they are.
    """
    rendered = [render(t, "\x00CLASS\x00") for t in templates]
    return hashlib.sha256(json.dumps(rendered).encode("utf-8")).hexdigest()


def default_cache_dir() -> Path:
    """``$DELTAKERN_CACHE`` or ``$XDG_CACHE_HOME/deltakern`` (``~/.cache/deltakern``), + ``/classifiers``."""
    root = os.environ.get("DELTAKERN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "deltakern"
    )
    return Path(root) / "classifiers"


def cache_key(
    model_name: str,
    weights: str,
    classnames: Sequence[str],
    templates: Sequence[Template],
    autocast_dtype: torch.dtype | None = None,
) -> dict:
    """The identity of a class-embedding matrix: model, weights, class names, templates, and the
    autocast dtype the text tower ran under (absent for float32, so float32 entries keep the key
    they had before the field existed)."""
    return {
        "version": CACHE_VERSION,
        "model": model_name,
        "weights": weights,
        "classnames_sha256": classnames_hash(classnames),
        "templates_sha256": templates_hash(templates),
        "num_classes": len(classnames),
        **autocast_field(autocast_dtype),
    }


def autocast_field(autocast_dtype: torch.dtype | None) -> dict:
    """``{"autocast": "bfloat16"}`` (or float16) for a cache key, ``{}`` for float32: embeddings
    made under autocast differ from float32 ones, so they must not share a cache entry."""
    return {} if autocast_dtype is None else {"autocast": str(autocast_dtype).removeprefix("torch.")}


def cached_class_embeddings(
    clip: "ClipModel",  # noqa: F821 - deltakern.clip.models.ClipModel, imported lazily
    classnames: Sequence[str],
    templates: Sequence[Template],
    *,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    **build_kwargs,
) -> torch.Tensor:
    """:func:`build_class_embeddings` through an on-disk cache.

    The file name is a hash of :func:`cache_key` (for random weights the seed is part of the
    key); files are written atomically, so concurrent processes never read a partial file.
    ``cache_dir=None`` uses :func:`default_cache_dir`. Returns ``[K, D]`` float32 on the
    model's device.
    """
    from safetensors.torch import load_file, save_file

    from deltakern.clip.models import NO_WEIGHTS, weights_identity

    _check_inputs(classnames, templates)
    weights = weights_identity(clip.pretrained)
    if clip.pretrained == NO_WEIGHTS:
        weights = f"{NO_WEIGHTS}:seed={seed}"
    key = cache_key(clip.name, weights, classnames, templates, build_kwargs.get("autocast_dtype"))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:32]
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = directory / f"{digest}.safetensors"
    if path.is_file():
        return load_file(str(path))["class_embeddings"].to(clip.device)
    W = build_class_embeddings(clip.model, clip.tokenizer, classnames, templates, device=clip.device, **build_kwargs)
    with atomic_path(path) as tmp:
        save_file({"class_embeddings": W.cpu()}, str(tmp), metadata={"key": json.dumps(key, sort_keys=True)})
    return W
