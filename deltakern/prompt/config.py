"""Every setting of a prompt-tuning run (:class:`TrainConfig`) and what a run returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from deltakern.core.constants import PRECISIONS
from deltakern.core.ebm import CE_ON, TARGETS
from deltakern.core.errors import InvalidArgument
from deltakern.core.validation import (
    check_bool,
    check_choice,
    check_finite_number,
    check_int_range,
    check_open_unit,
    check_positive,
)
from deltakern.prompt.learner import CLASS_TOKEN_POSITIONS, DEFAULT_INIT, PromptLearner

OPTIMIZERS = ("sgd", "adamw")


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
            raise InvalidArgument(f"model must name an open_clip architecture, got {self.model!r}")
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
        check_choice("target", self.target, TARGETS)
        check_choice("ce_on", self.ce_on, CE_ON)
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
