"""Prompt tuning with the EBM loss: CoOp-style context vectors over a frozen open_clip model.

Both encoders stay frozen; the only trainable tensor is the context ``ctx [n_ctx, width]`` that
replaces the context words of every class prompt (``"X X X X {class}."``). The prompts run
through the model's own text tower, so the class embeddings ``W [K, D]`` are exactly what
``encode_text`` computes, with gradient to the context only. The loss is :class:`deltakern.EBMLoss`
(docs/conventions.md §6).

Pieces, usable on their own in a custom loop (one module each):

- :class:`PromptLearner` (``learner``): ``learner()`` -> ``[K, D]`` class embeddings.
- :func:`few_shot_samples`, :func:`augment_transform`, :func:`encode_images` (``fewshot``).
- :class:`TrainConfig`, :class:`TrainResult` (``config``); :func:`train` (``loop``): SGD + warm-up
  + cosine, optional AdamW, mixed precision on GPU, gradient accumulation, per-epoch reseeding,
  checkpoints, resume, DistributedDataParallel under ``torchrun``.
- :func:`save_checkpoint`, :func:`load_checkpoint`, :func:`learner_from_checkpoint`,
  :func:`class_embeddings_from_checkpoint`, :func:`export_class_embeddings` (``checkpoint``).
- :func:`benchmark_steps` (``benchmark``): optimizer steps per second on synthetic images.

Importing this package imports neither open_clip nor torchvision; the functions that need them do.
"""

from deltakern.prompt.benchmark import benchmark_steps
from deltakern.prompt.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    class_embeddings_from_checkpoint,
    export_class_embeddings,
    learner_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from deltakern.prompt.config import OPTIMIZERS, RUN_ONLY_SETTINGS, TrainConfig, TrainResult
from deltakern.prompt.fewshot import augment_transform, encode_images, few_shot_samples
from deltakern.prompt.learner import CLASS_TOKEN_POSITIONS, DEFAULT_INIT, DEFAULT_N_CTX, PromptLearner
from deltakern.prompt.loop import train, warmup_cosine

__all__ = [
    "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "CLASS_TOKEN_POSITIONS", "DEFAULT_INIT", "DEFAULT_N_CTX",
    "OPTIMIZERS", "RUN_ONLY_SETTINGS", "PromptLearner", "TrainConfig", "TrainResult", "augment_transform",
    "benchmark_steps", "class_embeddings_from_checkpoint", "encode_images", "export_class_embeddings",
    "few_shot_samples", "learner_from_checkpoint", "load_checkpoint", "save_checkpoint", "train",
    "warmup_cosine",
]
