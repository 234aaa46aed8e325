"""The prompt-tuning loop: :func:`train` runs a :class:`~deltakern.prompt.config.TrainConfig`
with :class:`deltakern.EBMLoss` (cross-entropy plus the ΔEnergy lower-bound term,
docs/conventions.md §6) on a frozen open_clip model, on one process or under torchrun."""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltakern._version import __version__
from deltakern.clip.preprocess import one_pass_transform
from deltakern.core.errors import InvalidArgument
from deltakern.core.validation import check_int_range
from deltakern.data.rundir import output_lock
from deltakern.loss import EBMLoss
from deltakern.prompt.checkpoint import export_class_embeddings, load_checkpoint, save_checkpoint
from deltakern.prompt.config import RUN_ONLY_SETTINGS, TrainConfig, TrainResult
from deltakern.prompt.fewshot import _ImageSamples, augment_transform, encode_images, few_shot_samples
from deltakern.prompt.learner import PromptLearner
from deltakern.runtime import Runtime, make_runtime, on_rank0
from deltakern.scoring import score


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup_steps``, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    remaining = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / remaining)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A seed for one (epoch, rank): augmentation is reproducible and resumes exactly."""
    import numpy as np

    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _check_resume(config: TrainConfig, checkpoint: dict[str, Any]) -> None:
    saved = checkpoint.get("settings", {})
    differs = [
        f"{key}={getattr(config, key)!r} (checkpoint: {saved[key]!r})"
        for key in saved
        if key not in RUN_ONLY_SETTINGS and hasattr(config, key) and saved[key] != getattr(config, key)
    ]
    if differs:
        raise InvalidArgument("resume must keep the checkpoint's settings; these differ: " + ", ".join(differs))


@dataclass
class _Run:
    """Everything one training run holds between epochs."""

    config: TrainConfig
    rt: Runtime
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


def _training_loader(run_config: TrainConfig, clip: Any, samples, rt: Runtime, progress: bool):
    """``(sampler, loader)`` over cached features or augmented images, sharded by rank."""
    if run_config.cache_image_features:
        features = encode_images(
            clip.model, samples, one_pass_transform(clip.preprocess), device=rt.device, batch_size=max(run_config.batch_size, 64),
            workers=run_config.workers, precision=rt.precision, progress=progress, runtime=rt,
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
        dataset, num_replicas=rt.world_size, rank=rt.rank, shuffle=True, seed=run_config.seed
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=run_config.batch_size, sampler=sampler, num_workers=workers,
        pin_memory=rt.device.type == "cuda",
    )
    return sampler, loader


def _train_epoch(run: _Run, epoch: int, progress: bool) -> dict[str, float]:
    """One epoch of optimizer steps; returns the epoch's metrics over all ranks."""
    from tqdm.auto import tqdm

    config, rt = run.config, run.rt
    device = rt.device
    run.sampler.set_epoch(epoch)
    seed = _epoch_seed(config.seed, epoch, rt.rank)
    torch.manual_seed(seed)
    random.seed(seed)
    run.learner.train()
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # loss, ce, delta, correct, ΔEnergy, rows
    began = step_began = time.perf_counter()
    n_batches = len(run.loader)
    bar = tqdm(run.loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not (progress and rt.main), leave=False)
    for i, (inputs, labels) in enumerate(bar):
        inputs = inputs.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if not config.cache_image_features:
            with torch.no_grad(), rt.autocast():
                inputs = run.clip.model.encode_image(inputs)
        image_features = inputs.float()
        first_of_group = i - i % config.accum_steps
        group_size = min(config.accum_steps, n_batches - first_of_group)
        steps = (i + 1) % config.accum_steps == 0 or i + 1 == n_batches
        # Gradients of the micro-batches before the last of a group stay local (no all-reduce).
        sync = contextlib.nullcontext() if steps or rt.world_size == 1 else run.module.no_sync()
        with sync:
            with rt.autocast():
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
    total = rt.all_reduce_sum(sums).cpu().tolist()
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
    return {
        "ctx": run.learner.ctx.detach().cpu().clone(),
        "classnames": classnames,
        "settings": asdict(run.config),
        "epoch": epoch,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else {},
        "history": history,
        "world_size": run.rt.world_size,
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

    from deltakern.clip.models import load_model

    config.validate()
    if stop_after_epochs is not None:
        check_int_range("stop_after_epochs", stop_after_epochs, 1, 10**6)
    checkpoint = load_checkpoint(resume) if resume is not None else None
    if checkpoint is not None:
        _check_resume(config, checkpoint)
    rt = make_runtime(config.device or "auto", config.precision)
    completed = False
    held = contextlib.ExitStack()
    try:
        if config.out is not None:
            # One run per checkpoint: a second `deltakern train` on the same --out is refused
            # (rank 0 holds the lock; a killed run's lock is released by the OS).
            out = Path(config.out)
            lock = out.parent / f".{out.name}.lock"
            held.enter_context(on_rank0(rt, lambda: output_lock(lock, f"the training run writing {out}")))
        if rt.precision == "fp16" and rt.device.type != "cuda":
            raise InvalidArgument(f"precision 'fp16' needs a CUDA device, got device {rt.device}; use 'bf16' or 'fp32'")
        device = rt.device
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        with warnings.catch_warnings():
            if not rt.main:
                warnings.simplefilter("ignore")  # one copy of load-time warnings, not one per rank
            clip = load_model(config.model, config.pretrained, device=device, seed=config.model_seed)
        if config.train_dir or checkpoint is None:
            samples, classnames = few_shot_samples(
                config.train_dir, config.shots, seed=config.seed, classnames_file=config.classnames_file
            )
        else:  # a resumed run with nothing left to train needs no data
            samples, classnames = [], list(checkpoint["classnames"])
        if checkpoint is not None and classnames != list(checkpoint["classnames"]):
            raise InvalidArgument(
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
                raise InvalidArgument(f"train_dir {config.train_dir!r} holds no images to train on")
            sampler, loader = _training_loader(config, clip, samples, rt, progress)
            steps_per_epoch = math.ceil(len(loader) / config.accum_steps)
            optimizer = _make_optimizer([learner.ctx], config)
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer,
                lambda step: warmup_cosine(step, config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch),
            )
            scaler = torch.amp.GradScaler(device.type, enabled=rt.precision == "fp16")
            if checkpoint is not None:
                optimizer.load_state_dict(checkpoint["optimizer"])
                scheduler.load_state_dict(checkpoint["scheduler"])
                if checkpoint.get("scaler"):
                    scaler.load_state_dict(checkpoint["scaler"])
            module: nn.Module = learner
            if rt.world_size > 1:
                # Buffers (token ids, attention masks) never change: no need to broadcast them each step.
                module = nn.parallel.DistributedDataParallel(
                    learner, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
                )
            loss_fn = EBMLoss(
                temperature=config.temperature, lam=config.lam, mask_ratio=config.mask_ratio, reset=config.reset,
                target=config.target, ce_on=config.ce_on, reduction="none", return_parts=True,
            )
            run = _Run(config, rt, clip, learner, module, loader, sampler, optimizer,
                       scheduler, scaler, loss_fn)
            for epoch in range(start_epoch, end_epoch):
                record = _train_epoch(run, epoch, progress)
                history.append(record)
                if progress and rt.main:
                    tqdm.write(
                        f"epoch {record['epoch']}/{config.epochs}  loss {record['loss']:.4f}  ce {record['ce']:.4f}  "
                        f"ΔE term {record['delta_term']:.4f}  acc {100 * record['accuracy']:.2f}%  "
                        f"mean ΔEnergy {record['mean_delta_energy']:.3f}  lr {record['lr']:.2e}  {record['seconds']:.1f}s"
                    )
                if config.out is not None and rt.main:
                    save_checkpoint(config.out, _checkpoint_state(run, classnames, epoch + 1, history))
        elif progress and rt.main:
            tqdm.write(f"the checkpoint has {start_epoch}/{config.epochs} epochs: nothing left to train")

        embeddings = learner.class_embeddings().cpu()
        if config.export_classes is not None and rt.main:
            export_class_embeddings(config.export_classes, embeddings)
        written = config.out if run is not None else resume
        result = TrainResult(
            learner=learner, class_embeddings=embeddings, history=history,
            step_times=run.step_times if run is not None else [], checkpoint=None if written is None else str(written),
        )
        completed = True
        return result
    finally:
        held.close()
        rt.close(barrier=completed)  # after a failure the other ranks may never reach a barrier
