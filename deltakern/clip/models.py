"""Load open_clip models for scoring: model, inference preprocessing and tokenizer in one call.

``pretrained`` is an open_clip tag (``"openai"``, ``"laion2b_s34b_b79k"``, ...), a path to a
local checkpoint file, or ``"none"`` for random weights (with a :class:`RandomWeightsWarning`;
seeded, so two runs build the same model, which resumable runs and multi-process runs rely on).

Weights of a tag come from the local cache when they are there (without touching the network);
otherwise they are downloaded once, and when the hub cannot be reached the error says so at
once and names the alternatives, instead of retrying for a minute.

A tiny architecture, :data:`TINY_MODEL`, is registered through open_clip's own config mechanism
so that tests and CPU benchmarks run in seconds: a 2-layer ViT on 32x32 images and a 2-layer
text transformer, both 64 wide, with 64-dimensional embeddings. Importing this module does not
import open_clip; :func:`load_model` does.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import re
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
# How long the reachability check of the model hub may take before the hub counts as offline.
HUB_PROBE_TIMEOUT_S = 10.0


class RandomWeightsWarning(UserWarning):
    """``pretrained='none'``: the model has random weights; its scores only serve tests."""


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
            # Without object addresses: two identical runs must record the same text.
            "preprocess": _ADDRESS.sub("", repr(self.preprocess)),
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

    For a local file: its absolute path, size and modification time; otherwise the tag itself
    (``"none"`` in any case spelling is ``"none"``).
    """
    if pretrained.lower() == NO_WEIGHTS:
        return NO_WEIGHTS
    if os.path.isfile(pretrained):
        st = os.stat(pretrained)
        return f"file:{os.path.abspath(pretrained)}:{st.st_size}:{st.st_mtime_ns}"
    return pretrained


def nearest_names(name: str, names: list[str], n: int = 3) -> list[str]:
    """Up to ``n`` of ``names`` closest to ``name`` (case-insensitive), nearest first."""
    by_lower = {x.lower(): x for x in names}
    return [by_lower[m] for m in difflib.get_close_matches(name.lower(), list(by_lower), n=n, cutoff=0.6)]


def check_model(name: str, pretrained: str) -> None:
    """Check that ``name`` is a known architecture and ``pretrained`` one of its tags, a local
    file or ``"none"``, without creating the model or fetching weights."""
    import open_clip

    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"model must be a non-empty open_clip model name, got {name!r}", param="model")
    if not isinstance(pretrained, str) or not pretrained:
        raise InvalidArgument(
            f"pretrained must be an open_clip tag, a checkpoint path or 'none', got {pretrained!r}", param="pretrained"
        )
    if name == TINY_MODEL:
        register_tiny_model()
    if name.startswith(("hf-hub:", "local-dir:")):
        return
    if name not in open_clip.list_models():
        near = nearest_names(name, open_clip.list_models())
        raise InvalidArgument(
            f"model must be an open_clip architecture (`deltakern models` lists them) or {TINY_MODEL!r}, got {name!r}"
            + (f"; nearest: {', '.join(near)}" if near else ""),
            param="model",
        )
    if pretrained.lower() != NO_WEIGHTS and not os.path.isfile(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise InvalidArgument(
                f"pretrained must be a local checkpoint file, 'none' or one of the tags of {name!r} "
                f"({', '.join(tags) or 'no published weights'}), got {pretrained!r}",
                param="pretrained",
            )


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
    ``"none"`` for random weights drawn from ``torch.manual_seed(seed)`` (a
    :class:`RandomWeightsWarning` says the scores are then meaningless except for testing). The
    weights of a tag are read from the local cache when present, else downloaded once; when they
    can be neither, the ``ValueError`` names the alternatives. The model stays in float32;
    callers use autocast for reduced precision.
    """
    import open_clip

    check_model(name, pretrained)
    device = torch.device(device)
    random_weights = pretrained.lower() == NO_WEIGHTS
    local_file = not random_weights and os.path.isfile(pretrained)
    hub_tag = not random_weights and not local_file and not name.startswith(("hf-hub:", "local-dir:"))
    if random_weights:
        warnings.warn(
            f"pretrained='none': model {name!r} has random weights (seed {seed}); its scores are only useful for testing",
            RandomWeightsWarning,
            stacklevel=2,
        )
    if hub_tag:
        _fetch_weights(name, pretrained, cache_dir)
    # Random weights come from a private RNG stream: the caller's global RNG state is left as
    # it was, and every process (ranks, resumed runs) builds the same model.
    with torch.random.fork_rng(devices=[]), _quiet_open_clip(), _hub_offline(hub_tag):
        torch.manual_seed(seed)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name,
                pretrained=None if random_weights else pretrained,
                device=device,
                cache_dir=cache_dir,
            )
        except Exception as exc:
            if not local_file:
                raise
            raise InvalidArgument(
                f"pretrained: cannot load {pretrained!r} as weights of {name!r} ({type(exc).__name__}: {exc})",
                param="pretrained",
            ) from None
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


def _fetch_weights(name: str, tag: str, cache_dir: str | None) -> None:
    """Make sure the weights of ``tag`` are in the local cache: look there first (no network),
    else check once that the hub answers and download. Raises ``InvalidArgument`` naming the
    alternatives when the weights can be neither found nor fetched."""
    import open_clip
    from open_clip.pretrained import has_hf_hub

    cfg = open_clip.get_pretrained_cfg(name, tag)
    reason = None
    if cfg.get("hf_hub") and has_hf_hub():
        with _hub_offline(True), _quiet_hub():
            try:
                if open_clip.download_pretrained(cfg, cache_dir=cache_dir):
                    return  # cached
            except Exception:
                pass
        reason = "HF_HUB_OFFLINE is set" if _env_offline() else _hub_unreachable()
    # else a URL download: open_clip checks its cache, then makes one attempt (no retry loop)
    if reason is None:
        with _quiet_hub():
            try:
                if open_clip.download_pretrained(cfg, cache_dir=cache_dir):
                    return
                reason = "nothing was downloaded"
            except Exception as exc:
                reason = f"{type(exc).__name__}: {_ADDRESS.sub('', str(exc))}"
    raise InvalidArgument(
        f"pretrained {tag!r}: the weights of {name!r} are not in the local cache and cannot be downloaded "
        f"({reason}). Give a local checkpoint file instead (pretrained=path/to/open_clip_model.safetensors), "
        "'none' for random weights (testing only), or run once with network access to fill the cache.",
        param="pretrained",
    )


def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_unreachable() -> str | None:
    """Why the model hub cannot be reached (one request, no retries), or None when it answers."""
    import huggingface_hub
    from huggingface_hub import constants

    try:
        huggingface_hub.get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as exc:  # any transport error: refused, DNS, timeout, proxy
        return f"the model hub {constants.ENDPOINT} cannot be reached: {type(exc).__name__}: {_ADDRESS.sub('', str(exc))}"
    return None


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """Run the block with the Hugging Face hub in offline mode (cached files only, no requests)."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


@contextlib.contextmanager
def _quiet_hub():
    """Hide the hub's per-retry log lines; the outcome is reported once, by the caller."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(level)


class _DropRandomInitNotice(logging.Filter):
    # open_clip logs its own "No pretrained weights loaded" line for pretrained=None;
    # RandomWeightsWarning already says it once.
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_open_clip():
    root = logging.getLogger()
    notice = _DropRandomInitNotice()
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


_ADDRESS = re.compile(r"\s*(?:at )?0x[0-9a-fA-F]+")


def _jsonable(value: Any) -> Any:
    """Preprocess configs hold tuples and enums; manifests want plain JSON."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
