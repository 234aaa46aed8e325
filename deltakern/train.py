"""Prompt tuning with the EBM loss: CoOp-style context vectors over a frozen open_clip model.

Both encoders stay frozen; the only trainable tensor is the context ``ctx [n_ctx, width]`` that
replaces the context words of every class prompt (``"X X X X {class}."``). The prompts run
through the model's own text tower, so the class embeddings ``W [K, D]`` are exactly what
``encode_text`` computes, with gradient to the context only. The loss is :class:`deltakern.EBMLoss`
(cross-entropy plus the ΔEnergy lower-bound term, SPEC.md §5).

Pieces, usable on their own in a custom loop:

- :class:`PromptLearner`: ``learner()`` -> ``[K, D]`` class embeddings (unnormalised).
- :func:`few_shot_samples`: ``shots`` images per class from a folder-per-class dataset.
- :func:`train` with :class:`TrainConfig`: the full loop (SGD + warm-up + cosine, optional
  AdamW, mixed precision on GPU, gradient accumulation, per-epoch reseeding, checkpoints,
  resume, DistributedDataParallel under ``torchrun``).
- :func:`save_checkpoint` / :func:`load_checkpoint` / :func:`class_embeddings_from_checkpoint`
  / :func:`export_class_embeddings`.
- :func:`benchmark_steps`: optimizer steps per second on synthetic images.

Importing this module imports neither open_clip nor torchvision; the functions that need them do.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ._validation import (
    check_bool,
    check_choice,
    check_finite_number,
    check_int_range,
    check_open_unit,
    check_positive,
)
from ._atomic import atomic_path

CHECKPOINT_FORMAT = "deltakern-prompts"
CHECKPOINT_VERSION = 1
CLASS_TOKEN_POSITIONS = ("end", "middle", "front")
OPTIMIZERS = ("sgd", "adamw")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEFAULT_INIT = "a photo of a"
DEFAULT_N_CTX = 16  # CoOp's context length for random initialisation
CTX_INIT_STD = 0.02  # CoOp's std for randomly initialised context vectors
# Two single-token words: tokenizing every prompt once with each, the positions where the two
# token sequences differ are exactly the context slots, whatever the tokenizer does elsewhere.
_PLACEHOLDERS = ("X", "Z")


# ---- the prompt learner -----------------------------------------------------------------------


def _text_tower(model: nn.Module) -> tuple[str, nn.Module]:
    """``(kind, token_embedding)`` of a supported open_clip text tower, else a TypeError.

    ``"clip"``: open_clip.CLIP, whose text transformer lives on the model itself;
    ``"text"``: CustomTextCLIP / CoCa, whose ``model.text`` is an open_clip TextTransformer.
    """
    from open_clip.model import CLIP
    from open_clip.transformer import TextTransformer

    if isinstance(model, CLIP):
        return "clip", model.token_embedding
    text = getattr(model, "text", None)
    if isinstance(text, TextTransformer):
        return "text", text.token_embedding
    tower = type(text).__name__ if text is not None else type(model).__name__
    raise TypeError(
        "model must be an open_clip model with a built-in text transformer (open_clip.CLIP, or "
        "CustomTextCLIP/CoCa with an open_clip TextTransformer text tower); got a "
        f"{type(model).__name__} whose text tower is {tower}. Hugging Face text towers (HFTextEncoder) "
        "are not supported: their prompts cannot take learned context vectors here"
    )


def _check_classnames(classnames: object) -> list[str]:
    if isinstance(classnames, str) or not isinstance(classnames, Sequence):
        raise TypeError(f"classnames must be a sequence of strings, got {type(classnames).__name__}")
    names = list(classnames)
    if not names:
        raise ValueError("classnames must contain at least one class name, got an empty sequence")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"classnames[{i}] must be a non-empty string, got {name!r}")
    return names


def _prompt(classname: str, n_ctx: int, position: str, placeholder: str) -> str:
    """The prompt text with ``n_ctx`` placeholder words where the context vectors go."""
    if position == "end":
        return " ".join([placeholder] * n_ctx + [classname]) + "."
    if position == "front":
        return " ".join([classname] + [placeholder] * n_ctx) + "."
    half = n_ctx // 2
    return " ".join([placeholder] * half + [classname] + [placeholder] * (n_ctx - half)) + "."


def _init_token_ids(tokenizer: Callable, text: str) -> torch.Tensor:
    """The token ids of ``text``'s words, without start/end/padding tokens.

    Tokenizers differ in their special tokens, so the words are found by aligning the
    tokenization of ``text`` with that of the empty string: the words are what ``text`` inserts.
    """
    full = tokenizer([text])[0]
    empty = tokenizer([""])[0]
    start = 0
    while start < len(full) and full[start] == empty[start]:
        start += 1
    for n in range(1, len(full) - start + 1):
        if torch.equal(full[start + n:], empty[start:len(empty) - n]):
            return full[start:start + n].clone()
    raise ValueError(f"init {text!r} does not fit the tokenizer's context length {len(full)}")


class PromptLearner(nn.Module):
    """Learned prompt context (CoOp) for an open_clip model; ``forward()`` -> ``[K, D]``.

    Each class prompt is ``n_ctx`` context slots plus the class name and a full stop; the slots
    hold the learnable vectors ``ctx [n_ctx, width]``, shared by all classes, in place of word
    embeddings. ``class_token_position`` puts the class name after the context (``"end"``,
    CoOp's default), before it (``"front"``) or in its middle (``"middle"``).

    ``init`` (default ``"a photo of a"``) initialises the context from those words' token
    embeddings, and then ``n_ctx`` defaults to (and must equal) their token count; with
    ``init=None`` the context is drawn from N(0, 0.02²) with a generator seeded by ``seed``
    and ``n_ctx`` defaults to 16.

    Supported text towers: open_clip ``CLIP`` and ``CustomTextCLIP``/``CoCa`` with an open_clip
    ``TextTransformer`` (any pooling, projection, attention mask or tokenizer they use); Hugging
    Face text towers raise a TypeError. ``tokenizer`` must be the model's
    (``open_clip.get_tokenizer(name)``); by default open_clip's CLIP tokenizer with the model's
    context length.

    With ``freeze=True`` (default) every parameter of ``model`` stops requiring gradients and the
    model is kept in eval mode (also by :meth:`train`), so that only ``ctx`` is trained and
    BatchNorm statistics never move. The model is a submodule: ``learner.to(device)`` moves it.
    """

    def __init__(
        self,
        model: nn.Module,
        classnames: Sequence[str],
        n_ctx: int | None = None,
        init: str | None = DEFAULT_INIT,
        class_token_position: str = "end",
        *,
        tokenizer: Callable | None = None,
        freeze: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        names = _check_classnames(classnames)
        check_choice("class_token_position", class_token_position, CLASS_TOKEN_POSITIONS)
        check_bool("freeze", freeze)
        if init is not None and (not isinstance(init, str) or not init.strip()):
            raise ValueError(f"init must be None or a non-empty string of context words, got {init!r}")
        kind, embedding = _text_tower(model)
        if tokenizer is None:
            from open_clip.tokenizer import SimpleTokenizer

            tokenizer = SimpleTokenizer(context_length=model.context_length)
        width = embedding.weight.shape[1]
        device = embedding.weight.device

        if init is not None:
            init_ids = _init_token_ids(tokenizer, init)
            if n_ctx is None:
                n_ctx = len(init_ids)
            elif n_ctx != len(init_ids):
                raise ValueError(
                    f"n_ctx must equal the number of tokens of init {init!r} ({len(init_ids)}) or be None, "
                    f"got {n_ctx}; pass init=None for {n_ctx} randomly initialised context vectors"
                )
            with torch.no_grad():
                ctx = embedding(init_ids.to(device)).detach().float()
        else:
            n_ctx = DEFAULT_N_CTX if n_ctx is None else n_ctx
            check_int_range("n_ctx", n_ctx, 1, 10_000)
            generator = torch.Generator().manual_seed(int(seed))
            ctx = (torch.randn(n_ctx, width, generator=generator) * CTX_INIT_STD).to(device)

        tokens = tokenizer([_prompt(n, n_ctx, class_token_position, _PLACEHOLDERS[0]) for n in names])
        other = tokenizer([_prompt(n, n_ctx, class_token_position, _PLACEHOLDERS[1]) for n in names])
        padding = tokenizer([""])[0, -1]
        slots = tokens != other
        for k, name in enumerate(names):
            # A prompt that fills the whole context was truncated (its class name or end token lost).
            if int(slots[k].sum()) != n_ctx or tokens[k, -1] != padding:
                raise ValueError(
                    f"classnames[{k}] {name!r}: the prompt with {n_ctx} context tokens does not fit the "
                    f"tokenizer's context length {tokens.shape[1]}; use a shorter class name or fewer context tokens"
                )

        self.model = model
        self.classnames = names
        self.n_ctx = n_ctx
        self.init = init
        self.class_token_position = class_token_position
        self._tower_kind = kind
        self.ctx = nn.Parameter(ctx)
        # Token ids drive the tower's pooling (end-token position) and padding masks; the slot
        # positions [K, n_ctx] say where the context vectors replace the placeholder embeddings.
        self.register_buffer("tokens", tokens.to(device), persistent=False)
        self.register_buffer("ctx_positions", slots.nonzero()[:, 1].view(len(names), n_ctx).to(device), persistent=False)
        if freeze:
            model.requires_grad_(False)
            model.eval()

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def _token_embedding(self) -> nn.Module:
        return self.model.token_embedding if self._tower_kind == "clip" else self.model.text.token_embedding

    def forward(self) -> torch.Tensor:
        """Class embeddings ``[K, D]`` (not normalised) with gradient to ``ctx`` only."""
        ctx = self.ctx
        positions = self.ctx_positions

        def put_context(_module, _inputs, embedded: torch.Tensor) -> torch.Tensor:
            # Runs inside the tower's own encode_text: swap the placeholder word embeddings for the
            # context vectors (out of place, so the frozen embedding table is untouched).
            index = positions.unsqueeze(-1).expand(-1, -1, embedded.shape[-1])
            src = ctx.to(embedded.dtype).unsqueeze(0).expand(positions.shape[0], -1, -1)
            return embedded.scatter(1, index, src)

        handle = self._token_embedding().register_forward_hook(put_context)
        try:
            if self._tower_kind == "clip":
                features = self.model.encode_text(self.tokens)
            else:
                features = self.model.text(self.tokens)
                if isinstance(features, tuple):  # towers that also return token features (CoCa)
                    features = features[0]
        finally:
            handle.remove()
        return features

    @torch.no_grad()
    def class_embeddings(self) -> torch.Tensor:
        """L2-normalised float32 class embeddings ``[K, D]``, detached."""
        return nn.functional.normalize(self().float(), dim=-1)

    def train(self, mode: bool = True) -> "PromptLearner":
        super().train(mode)
        self.model.eval()  # the frozen model never leaves eval mode (dropout off, BN stats fixed)
        return self

    def extra_repr(self) -> str:
        return (
            f"classes={self.num_classes}, n_ctx={self.n_ctx}, width={self.ctx.shape[1]}, "
            f"init={self.init!r}, class_token_position={self.class_token_position!r}"
        )


# ---- checkpoints --------------------------------------------------------------------------------


def _atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Write a file through ``write(fileobj)`` into a temporary sibling, then rename it in place."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def save_checkpoint(path: str | os.PathLike, checkpoint: dict[str, Any]) -> None:
    """Write a prompt checkpoint atomically (``torch.save`` format; see :func:`train` for keys)."""
    if not isinstance(checkpoint, dict) or "ctx" not in checkpoint or "classnames" not in checkpoint:
        raise ValueError("checkpoint must be a dict with at least 'ctx' and 'classnames'")
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **checkpoint}
    _atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain Python only)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"path {str(path)!r} is not a deltakern prompt checkpoint (format {CHECKPOINT_FORMAT!r})")
    if checkpoint.get("version", 0) > CHECKPOINT_VERSION:
        raise ValueError(
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
        raise ValueError(
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
    _atomic_write(path, lambda f: np.save(f, array))


# ---- data -------------------------------------------------------------------------------------


def read_classnames(path: str | os.PathLike) -> list[str]:
    """Class names from a text file, one per line (blank lines and ``#`` comments skipped)."""
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f]
    return [n for n in names if n and not n.startswith("#")]


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

    from .data import IMAGE_EXTENSIONS

    check_int_range("shots", shots, 0, 10**9)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"training folder not found: {root}")
    folder = ImageFolder(str(root), is_valid_file=lambda p: os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS)
    if classnames_file is not None:
        names = read_classnames(classnames_file)
        if len(names) != len(folder.classes):
            raise ValueError(
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
    mean = cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))
    std = cfg.get("std", (0.26862954, 0.26130258, 0.27577711))
    mode = T.InterpolationMode.BILINEAR if cfg.get("interpolation") == "bilinear" else T.InterpolationMode.BICUBIC
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=mode),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


# ---- distributed helpers ------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_pref: str | None) -> _Dist:
    """Join the process group torchrun describes (WORLD_SIZE > 1); gloo on CPU, nccl on CUDA."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = torch.cuda.is_available() and (device_pref in (None, "auto") or device_pref.startswith("cuda"))
    if on_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if on_cuda else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, True)


def _all_reduce_sum(values: torch.Tensor, info: _Dist) -> torch.Tensor:
    if info.world > 1:
        import torch.distributed as dist

        values = values.clone()
        dist.all_reduce(values)
    return values


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A seed for one (epoch, rank): augmentation is reproducible and resumes exactly."""
    import numpy as np

    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


# ---- configuration and loop ---------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Every setting of a training run (stored in the checkpoint as ``settings``).

    ``batch_size`` is per process; the global batch is ``batch_size × world size × accum_steps``.
    """

    model: str = ""
    pretrained: str = "none"
    train_dir: str = ""
    out: str | None = None
    classnames_file: str | None = None
    shots: int = 16
    epochs: int = 30
    batch_size: int = 32
    accum_steps: int = 1
    optimizer: str = "sgd"
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    n_ctx: int | None = None
    init: str | None = DEFAULT_INIT
    class_token_position: str = "end"
    temperature: float = 0.01
    lam: float = 1.0
    mask_ratio: float = 0.5
    reset: float = 0.0
    target: str = "pred"
    ce_on: str = "original"
    cache_image_features: bool = False
    precision: str = "auto"
    seed: int = 1
    model_seed: int = 0
    workers: int = 2
    device: str | None = None
    export_classes: str | None = None

    def validate(self) -> "TrainConfig":
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must name an open_clip architecture, got {self.model!r}")
        check_int_range("shots", self.shots, 0, 10**9)
        check_int_range("epochs", self.epochs, 1, 10**6)
        check_int_range("batch_size", self.batch_size, 1, 10**7)
        check_int_range("accum_steps", self.accum_steps, 1, 10**6)
        check_int_range("warmup_epochs", self.warmup_epochs, 0, 10**6)
        check_int_range("workers", self.workers, 0, 1024)
        check_int_range("seed", self.seed, 0, 2**63 - 1)
        check_int_range("model_seed", self.model_seed, 0, 2**63 - 1)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("class_token_position", self.class_token_position, CLASS_TOKEN_POSITIONS)
        check_choice("target", self.target, ("pred", "label"))
        check_choice("ce_on", self.ce_on, ("original", "edited"))
        check_positive("lr", self.lr)
        check_positive("temperature", self.temperature)
        check_open_unit("mask_ratio", self.mask_ratio)
        check_finite_number("lam", self.lam)
        check_finite_number("reset", self.reset)
        check_finite_number("momentum", self.momentum)
        check_finite_number("weight_decay", self.weight_decay)
        check_bool("cache_image_features", self.cache_image_features)
        if self.n_ctx is not None:
            check_int_range("n_ctx", self.n_ctx, 1, 10_000)
        return self


# Settings that may differ between a checkpoint and the run resuming it; all others define the
# run (model, data sample, context, loss, optimiser) and must match.
RUN_ONLY_SETTINGS = frozenset({"out", "epochs", "workers", "device", "export_classes", "train_dir", "classnames_file"})


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank)."""

    learner: PromptLearner
    class_embeddings: torch.Tensor  # [K, D], L2-normalised float32, on CPU
    history: list[dict[str, float]]  # one dict per epoch (all epochs, including resumed ones)
    step_times: list[float] = field(default_factory=list)  # seconds per optimizer step, this call
    checkpoint: str | None = None


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup_steps``, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    remaining = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / remaining)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision 'fp16' needs a CUDA device, got device {device}; use 'bf16' or 'fp32'")
    return precision


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


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
    _dist: _Dist | None = None,
) -> torch.Tensor:
    """Frozen image features ``[N, D]`` (float32, CPU) of ``samples`` in order, without augmentation.

    Under torchrun each rank encodes every ``world``-th image and the parts are all-gathered.
    """
    from tqdm.auto import tqdm

    info = _dist or _Dist()
    mine = list(range(info.rank, len(samples), info.world))
    loader = torch.utils.data.DataLoader(
        _ImageSamples([samples[i] for i in mine], transform), batch_size=batch_size, shuffle=False, num_workers=workers
    )
    parts = []
    for images, _ in tqdm(loader, desc="encoding images", disable=not (progress and info.main), leave=False):
        with _autocast(device, precision):
            parts.append(model.encode_image(images.to(device, non_blocking=True)).float())
    dim = int(model.visual.output_dim)
    local = torch.cat(parts) if parts else torch.empty(0, dim, device=device)
    if info.world == 1:
        return local.cpu()
    import torch.distributed as dist

    per_rank = math.ceil(len(samples) / info.world)
    padded = torch.zeros(per_rank, dim, device=device)
    padded[: len(local)] = local
    gathered = [torch.empty_like(padded) for _ in range(info.world)]
    dist.all_gather(gathered, padded)
    features = torch.empty(len(samples), dim)
    for r, part in enumerate(gathered):
        rows = list(range(r, len(samples), info.world))
        features[rows] = part[: len(rows)].cpu()
    return features


def _check_resume(config: TrainConfig, checkpoint: dict[str, Any]) -> None:
    saved = checkpoint.get("settings", {})
    differs = [
        f"{key}={getattr(config, key)!r} (checkpoint: {saved[key]!r})"
        for key in saved
        if key not in RUN_ONLY_SETTINGS and hasattr(config, key) and saved[key] != getattr(config, key)
    ]
    if differs:
        raise ValueError("resume must keep the checkpoint's settings; these differ: " + ", ".join(differs))


def _pick_device(config: TrainConfig, info: _Dist) -> torch.device:
    if config.device not in (None, "auto"):
        return torch.device(config.device)
    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


@dataclass
class _Run:
    """Everything one training run holds between epochs."""

    config: TrainConfig
    info: _Dist
    device: torch.device
    precision: str
    clip: Any
    learner: PromptLearner
    module: nn.Module  # the learner, or its DistributedDataParallel wrapper
    loader: torch.utils.data.DataLoader
    sampler: torch.utils.data.DistributedSampler
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    step_times: list[float] = field(default_factory=list)


def _training_loader(run_config: TrainConfig, clip: Any, samples, device, precision, info, progress):
    """``(sampler, loader)`` over cached features or augmented images, sharded by rank."""
    if run_config.cache_image_features:
        features = encode_images(
            clip.model, samples, clip.preprocess, device=device, batch_size=max(run_config.batch_size, 64),
            workers=run_config.workers, precision=precision, progress=progress, _dist=info,
        )
        labels = torch.tensor([label for _, label in samples])
        dataset: torch.utils.data.Dataset = torch.utils.data.TensorDataset(features, labels)
        workers = 0  # rows of a tensor: worker processes would only add overhead
    else:
        dataset = _ImageSamples(samples, augment_transform(clip.model))
        workers = run_config.workers
    # The same sampler for one process and for many: its (seed, epoch) permutation cut into
    # global batches is what every rank shares out, so the runs see the same global batches.
    sampler = torch.utils.data.DistributedSampler(
        dataset, num_replicas=info.world, rank=info.rank, shuffle=True, seed=run_config.seed
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=run_config.batch_size, sampler=sampler, num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    return sampler, loader


def _train_epoch(run: _Run, epoch: int, progress: bool) -> dict[str, float]:
    """One epoch of optimizer steps; returns the epoch's metrics over all ranks."""
    from tqdm.auto import tqdm

    from .scoring import score

    config, device = run.config, run.device
    run.sampler.set_epoch(epoch)
    seed = _epoch_seed(config.seed, epoch, run.info.rank)
    torch.manual_seed(seed)
    random.seed(seed)
    run.learner.train()
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # loss, ce, delta, correct, ΔEnergy, rows
    began = step_began = time.perf_counter()
    n_batches = len(run.loader)
    bar = tqdm(run.loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not (progress and run.info.main), leave=False)
    for i, (inputs, labels) in enumerate(bar):
        inputs = inputs.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if not config.cache_image_features:
            with torch.no_grad(), _autocast(device, run.precision):
                inputs = run.clip.model.encode_image(inputs)
        image_features = inputs.float()
        first_of_group = i - i % config.accum_steps
        group_size = min(config.accum_steps, n_batches - first_of_group)
        steps = (i + 1) % config.accum_steps == 0 or i + 1 == n_batches
        # Gradients of the micro-batches before the last of a group stay local (no all-reduce).
        sync = contextlib.nullcontext() if steps or run.info.world == 1 else run.module.no_sync()
        with sync:
            with _autocast(device, run.precision):
                class_features = run.module()
            per_row, parts = run.loss_fn(image_features, class_features.float(), labels)
            run.scaler.scale(per_row.mean() / group_size).backward()
        if steps:
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.optimizer.zero_grad(set_to_none=True)
            run.scheduler.step()
            now = time.perf_counter()
            run.step_times.append(now - step_began)
            step_began = now
        with torch.no_grad():
            scores = score(image_features, class_features.detach().float(), temperature=config.temperature, reset=config.reset)
            sums += torch.stack([
                per_row.sum(), parts["ce"].sum(), parts["delta"].sum(), (scores.pred == labels).sum(),
                scores.delta_energy.sum(), torch.tensor(float(len(labels)), device=device),
            ]).double()
        if not bar.disable and (i % max(1, n_batches // 20) == 0 or i + 1 == n_batches):
            bar.set_postfix(loss=f"{sums[0].item() / sums[5].item():.4f}", lr=f"{run.scheduler.get_last_lr()[0]:.2e}")
    bar.close()
    total = _all_reduce_sum(sums, run.info).cpu().tolist()
    rows = total[5]
    return {
        "epoch": epoch + 1,
        "loss": total[0] / rows,
        "ce": total[1] / rows,
        "delta_term": total[2] / rows,
        "accuracy": total[3] / rows,
        "mean_delta_energy": total[4] / rows,
        "lr": run.scheduler.get_last_lr()[0],
        "seconds": time.perf_counter() - began,
    }


def _checkpoint_state(run: _Run, classnames: list[str], epoch: int, history: list[dict[str, float]]) -> dict[str, Any]:
    from . import __version__

    return {
        "ctx": run.learner.ctx.detach().cpu().clone(),
        "classnames": classnames,
        "settings": asdict(run.config),
        "epoch": epoch,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else {},
        "history": history,
        "world_size": run.info.world,
        "deltakern_version": __version__,
        "torch_version": str(torch.__version__),
    }


def train(
    config: TrainConfig,
    *,
    resume: str | os.PathLike | None = None,
    stop_after_epochs: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train prompt context vectors with :class:`deltakern.EBMLoss` on a few-shot image folder.

    Per epoch: ``DistributedSampler`` shuffling seeded by ``(seed, epoch)`` (the same global batches
    for one process or many; when the sample count is not a multiple of the world size the
    sampler repeats a few samples), the global RNG reseeded from ``(seed, epoch, rank)``
    (augmentations repeat exactly on resume), SGD/AdamW on the context only, a per-step learning
    rate with linear warm-up over ``warmup_epochs`` and cosine decay to 0 over the remaining steps,
    the loss averaged over each micro-batch and over the ``accum_steps`` micro-batches of an
    optimizer step. Logged per epoch (tqdm): loss, CE, ΔE term, accuracy and mean ΔEnergy
    (``c=1``, the loss's temperature and reset) over all ranks, with the context before each step.

    After every epoch rank 0 writes ``config.out`` atomically with keys ``ctx``, ``classnames``,
    ``settings`` (``asdict(config)``), ``epoch`` (completed), ``optimizer``, ``scheduler``,
    ``scaler``, ``history``, ``world_size``, ``deltakern_version``, ``torch_version``. ``resume``
    continues from such a checkpoint (its settings other than :data:`RUN_ONLY_SETTINGS` must match
    ``config``); ``stop_after_epochs`` ends this call early (time-limited jobs) without changing the
    schedule. Under ``torchrun`` (WORLD_SIZE > 1) the learner runs in DistributedDataParallel;
    ``batch_size`` is per process.
    """
    from tqdm.auto import tqdm

    from .clip_models import load_model
    from .loss import EBMLoss

    config.validate()
    if stop_after_epochs is not None:
        check_int_range("stop_after_epochs", stop_after_epochs, 1, 10**6)
    checkpoint = load_checkpoint(resume) if resume is not None else None
    if checkpoint is not None:
        _check_resume(config, checkpoint)
    info = _init_distributed(config.device)
    completed = False
    try:
        device = _pick_device(config, info)
        precision = _resolve_precision(config.precision, device)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        with warnings.catch_warnings():
            if not info.main:
                warnings.simplefilter("ignore")  # one copy of load-time warnings, not one per rank
            clip = load_model(config.model, config.pretrained, device=device, seed=config.model_seed)
        if config.train_dir or checkpoint is None:
            samples, classnames = few_shot_samples(
                config.train_dir, config.shots, seed=config.seed, classnames_file=config.classnames_file
            )
        else:  # a resumed run with nothing left to train needs no data
            samples, classnames = [], list(checkpoint["classnames"])
        if checkpoint is not None and classnames != list(checkpoint["classnames"]):
            raise ValueError(
                f"train_dir {config.train_dir!r} has the classes {classnames[:5]}... but the checkpoint was trained "
                f"on {list(checkpoint['classnames'])[:5]}... ({len(checkpoint['classnames'])} classes)"
            )
        learner = PromptLearner(
            clip.model, classnames, n_ctx=config.n_ctx, init=config.init,
            class_token_position=config.class_token_position, tokenizer=clip.tokenizer, seed=config.seed,
        ).to(device)
        if checkpoint is not None:
            with torch.no_grad():
                learner.ctx.copy_(checkpoint["ctx"].to(device))
        start_epoch = int(checkpoint["epoch"]) if checkpoint is not None else 0
        history: list[dict[str, float]] = list(checkpoint.get("history", [])) if checkpoint is not None else []
        end_epoch = config.epochs if stop_after_epochs is None else min(config.epochs, start_epoch + stop_after_epochs)
        run: _Run | None = None

        if start_epoch < end_epoch:
            if not samples:
                raise ValueError(f"train_dir {config.train_dir!r} holds no images to train on")
            sampler, loader = _training_loader(config, clip, samples, device, precision, info, progress)
            steps_per_epoch = math.ceil(len(loader) / config.accum_steps)
            optimizer = _make_optimizer([learner.ctx], config)
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer,
                lambda step: warmup_cosine(step, config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch),
            )
            scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
            if checkpoint is not None:
                optimizer.load_state_dict(checkpoint["optimizer"])
                scheduler.load_state_dict(checkpoint["scheduler"])
                if checkpoint.get("scaler"):
                    scaler.load_state_dict(checkpoint["scaler"])
            module: nn.Module = learner
            if info.world > 1:
                # Buffers (token ids, attention masks) never change: no need to broadcast them each step.
                module = nn.parallel.DistributedDataParallel(
                    learner, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
                )
            loss_fn = EBMLoss(
                temperature=config.temperature, lam=config.lam, mask_ratio=config.mask_ratio, reset=config.reset,
                target=config.target, ce_on=config.ce_on, reduction="none", return_parts=True,
            )
            run = _Run(config, info, device, precision, clip, learner, module, loader, sampler, optimizer,
                       scheduler, scaler, loss_fn)
            for epoch in range(start_epoch, end_epoch):
                record = _train_epoch(run, epoch, progress)
                history.append(record)
                if progress and info.main:
                    tqdm.write(
                        f"epoch {record['epoch']}/{config.epochs}  loss {record['loss']:.4f}  ce {record['ce']:.4f}  "
                        f"ΔE term {record['delta_term']:.4f}  acc {100 * record['accuracy']:.2f}%  "
                        f"mean ΔEnergy {record['mean_delta_energy']:.3f}  lr {record['lr']:.2e}  {record['seconds']:.1f}s"
                    )
                if config.out is not None and info.main:
                    save_checkpoint(config.out, _checkpoint_state(run, classnames, epoch + 1, history))
        elif progress and info.main:
            tqdm.write(f"the checkpoint has {start_epoch}/{config.epochs} epochs: nothing left to train")

        embeddings = learner.class_embeddings().cpu()
        if config.export_classes is not None and info.main:
            export_class_embeddings(config.export_classes, embeddings)
        written = config.out if run is not None else resume
        result = TrainResult(
            learner=learner, class_embeddings=embeddings, history=history,
            step_times=run.step_times if run is not None else [], checkpoint=None if written is None else str(written),
        )
        completed = True
        return result
    finally:
        if info.owns_group:
            import torch.distributed as dist

            if completed:  # after a failure the other ranks may never reach a barrier
                dist.barrier()
            dist.destroy_process_group()


# ---- benchmark hook ---------------------------------------------------------------------------


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

    ``clip`` is a :class:`deltakern.clip_models.ClipModel`. A step is what :func:`train` does per
    batch: (without ``cache_image_features``) encode ``batch_size`` images with the frozen image
    tower, run the text tower over ``num_classes`` prompts, the EBM loss (``loss_kwargs``),
    backward and an SGD step; with ``cache_image_features`` the images are encoded once, before
    timing. Returns ``steps_per_second`` (median step), ``step_times`` (seconds) and the shape.
    """
    from .loss import EBMLoss

    check_int_range("steps", steps, 1, 10**6)
    check_int_range("warmup_steps", warmup_steps, 0, 10**6)
    model = clip.model
    device = next(model.parameters()).device
    precision = _resolve_precision(precision, device)
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
        with torch.no_grad(), _autocast(device, precision):
            cached = model.encode_image(images).float()

    def step() -> None:
        if cached is None:
            with torch.no_grad(), _autocast(device, precision):
                features = model.encode_image(images).float()
        else:
            features = cached
        with _autocast(device, precision):
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

