"""Load open_clip models for scoring: model, inference preprocessing and tokenizer in one call.

``pretrained`` is an open_clip tag (``"openai"``, ``"laion2b_s34b_b79k"``, ...), a path to a
local checkpoint file, or ``"none"`` for random weights (with a warning; seeded, so two runs
build the same model, which resumable runs and multi-process runs rely on).

A tiny architecture, :data:`TINY_MODEL`, is registered through open_clip's own config mechanism
so that tests and CPU benchmarks run in seconds: a 2-layer ViT on 32x32 images and a 2-layer
text transformer, both 64 wide, with 64-dimensional embeddings. Importing this module does not
import open_clip; :func:`load_model` does.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from deltakern.core.errors import InvalidArgument

TINY_MODEL = "deltakern-tiny"
TINY_MODEL_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
NO_WEIGHTS = "none"


@dataclass
class ClipModel:
    """An open_clip model ready for inference and what belongs with it."""

    model: torch.nn.Module  # eval mode, on ``device``
    preprocess: Callable  # PIL image -> tensor [3, H, W] (the model's own inference transform)
    tokenizer: Callable  # list[str] -> LongTensor [n, context_length]
    name: str
    pretrained: str
    device: torch.device

    @property
    def embed_dim(self) -> int:
        """Dimension D of the image and text embeddings."""
        return int(self.model.visual.output_dim)

    def describe(self) -> dict[str, Any]:
        """What identifies the model and its preprocessing (recorded in manifests)."""
        return {
            "model": self.name,
            "pretrained": self.pretrained,
            "weights": weights_identity(self.pretrained),
            "preprocess_cfg": _jsonable(getattr(self.model.visual, "preprocess_cfg", {})),
            "preprocess": repr(self.preprocess),
        }


def register_tiny_model() -> str:
    """Register :data:`TINY_MODEL` with open_clip (idempotent) and return its name."""
    import open_clip

    if TINY_MODEL in open_clip.list_models():
        return TINY_MODEL
    # open_clip reads architecture configs from JSON files; the file is only needed while the
    # registry is rescanned, so it lives in a temporary directory.
    with tempfile.TemporaryDirectory(prefix="deltakern-model-config-") as tmp:
        path = os.path.join(tmp, f"{TINY_MODEL}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(TINY_MODEL_CONFIG, f)
        open_clip.add_model_config(path)
    return TINY_MODEL


def weights_identity(pretrained: str) -> str:
    """A string that changes when the weights ``pretrained`` names change.

    For a local file: its absolute path, size and modification time; otherwise the tag itself.
    """
    if pretrained != NO_WEIGHTS and os.path.isfile(pretrained):
        st = os.stat(pretrained)
        return f"file:{os.path.abspath(pretrained)}:{st.st_size}:{st.st_mtime_ns}"
    return pretrained


def load_model(
    name: str,
    pretrained: str = NO_WEIGHTS,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    cache_dir: str | None = None,
) -> ClipModel:
    """Create an open_clip model in eval mode with its inference preprocess and tokenizer.

    ``name`` is any open_clip architecture (``open_clip.list_models()``), ``hf-hub:...`` or
    :data:`TINY_MODEL`. ``pretrained`` is an open_clip tag, a local checkpoint path, or
    ``"none"`` for random weights drawn from ``torch.manual_seed(seed)`` (a warning says the
    scores are then meaningless except for testing). The model stays in float32; callers use
    autocast for reduced precision.
    """
    import open_clip

    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"model must be a non-empty open_clip model name, got {name!r}")
    if not isinstance(pretrained, str) or not pretrained:
        raise InvalidArgument(f"pretrained must be an open_clip tag, a checkpoint path or 'none', got {pretrained!r}")
    if name == TINY_MODEL:
        register_tiny_model()
    device = torch.device(device)
    random_weights = pretrained.lower() == NO_WEIGHTS
    known = open_clip.list_models()
    if not name.startswith(("hf-hub:", "local-dir:")) and name not in known:
        raise InvalidArgument(
            f"model must be an open_clip architecture (see open_clip.list_models()) or {TINY_MODEL!r}, got {name!r}"
        )
    if not random_weights and not os.path.isfile(pretrained) and not name.startswith(("hf-hub:", "local-dir:")):
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise InvalidArgument(
                f"pretrained must be a local checkpoint file, 'none' or one of the tags of {name!r} "
                f"({', '.join(tags) or 'no published weights'}), got {pretrained!r}"
            )
    if random_weights:
        warnings.warn(
            f"pretrained='none': model {name!r} has random weights (seed {seed}); "
            "its scores are only useful for testing",
            stacklevel=2,
        )
    # Random weights come from a private RNG stream: the caller's global RNG state is left as
    # it was, and every process (ranks, resumed runs) builds the same model.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, _, preprocess = open_clip.create_model_and_transforms(
            name,
            pretrained=None if random_weights else pretrained,
            device=device,
            cache_dir=cache_dir,
        )
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    return ClipModel(
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        name=name,
        pretrained=NO_WEIGHTS if random_weights else pretrained,
        device=device,
    )


def _jsonable(value: Any) -> Any:
    """Preprocess configs hold tuples and enums; manifests want plain JSON."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
