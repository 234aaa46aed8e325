"""``deltakern train``: learn prompt context vectors with the EBM loss on a few-shot image folder."""

from __future__ import annotations

import argparse

from deltakern.cli.options import DEVICE_HELP
from deltakern.core.constants import PRECISIONS
from deltakern.core.ebm import CE_ON, TARGETS
from deltakern.core.errors import InvalidArgument
from deltakern.prompt.config import OPTIMIZERS
from deltakern.prompt.learner import CLASS_TOKEN_POSITIONS

# CLI option -> TrainConfig field, for every option that is a setting of the run
_FIELDS = {
    "model": "model",
    "pretrained": "pretrained",
    "model_seed": "model_seed",
    "train": "train_dir",
    "classnames": "classnames_file",
    "out": "out",
    "shots": "shots",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "accum_steps": "accum_steps",
    "optimizer": "optimizer",
    "lr": "lr",
    "momentum": "momentum",
    "weight_decay": "weight_decay",
    "warmup_epochs": "warmup_epochs",
    "n_ctx": "n_ctx",
    "init": "init",
    "class_token_position": "class_token_position",
    "temperature": "temperature",
    "lam": "lam",
    "mask_ratio": "mask_ratio",
    "reset": "reset",
    "target": "target",
    "ce_on": "ce_on",
    "cache_image_features": "cache_image_features",
    "precision": "precision",
    "seed": "seed",
    "workers": "workers",
    "device": "device",
    "export_classes": "export_classes",
}


def register(sub: argparse._SubParsersAction) -> None:
    from deltakern.prompt import TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "train",
        help="tune prompt context vectors with the EBM loss (CoOp-style, frozen open_clip)",
        description="Learn the context vectors of the class prompts of a frozen open_clip model with "
        "cross-entropy plus the ΔEnergy lower-bound term (dk.EBMLoss) on a few-shot sample of a "
        "folder-per-class dataset (DIR/CLASS/*.jpg). Logs loss, CE, ΔE term, accuracy and mean "
        "ΔEnergy per epoch, and writes a checkpoint (context, every setting, optimizer and schedule "
        "state) atomically after every epoch. Use the result with `deltakern score --prompts OUT` or "
        "export the class embeddings for `deltakern eval --classes` with --export-classes. "
        "Under torchrun every process trains a share of each batch (DistributedDataParallel).",
        epilog="Resume: `deltakern train --resume ckpt.pt` continues with the checkpoint's settings "
        "(--epochs, --out, --workers, --device, --train, --classnames and --export-classes may change; "
        "other options must agree with it). `deltakern train --resume ckpt.pt --export-classes W.npy` "
        "on a finished run only exports.",
    )
    # Defaults stay None so that a resumed run can tell what was given on the command line.
    model = p.add_argument_group("model and data")
    model.add_argument("--model", help="open_clip architecture, e.g. ViT-B-32, or deltakern-tiny for tests")
    model.add_argument(
        "--pretrained",
        help=f"open_clip pretrained tag (e.g. openai), a local checkpoint file, or 'none' for random weights "
        f"(default {d.pretrained!r}: testing only)",
    )
    model.add_argument("--model-seed", type=int, help=f"seed of the random weights of --pretrained none (default {d.model_seed})")
    model.add_argument("--train", metavar="DIR", help="training images, one sub-folder per class (ImageFolder layout)")
    model.add_argument(
        "--classnames",
        metavar="FILE",
        help="class names, one per line in sorted folder order (default: folder names, '_' read as a space)",
    )
    model.add_argument("--shots", type=int, help=f"images per class, drawn with --seed; 0 = all (default {d.shots})")
    model.add_argument(
        "--cache-image-features",
        action="store_true",
        default=None,
        help="encode the training images once without augmentation (fast: each epoch runs only the text "
        "tower); default: random resized crop + flip every epoch",
    )

    prompt = p.add_argument_group("prompt")
    prompt.add_argument(
        "--init",
        help=f"words that initialise the context, or 'none' for random N(0, 0.02²) vectors (default {d.init!r})",
    )
    prompt.add_argument(
        "--n-ctx", type=int, help="context length (default: the token count of --init, or 16 with --init none)"
    )
    prompt.add_argument(
        "--class-token-position",
        choices=CLASS_TOKEN_POSITIONS,
        help=f"where the class name goes relative to the context (default {d.class_token_position})",
    )

    loss = p.add_argument_group("EBM loss (docs/conventions.md §6)")
    loss.add_argument("--temperature", type=float, help=f"softmax temperature τ (default {d.temperature})")
    loss.add_argument("--lam", type=float, help=f"weight λ of the ΔE term (default {d.lam}; 0 = plain CoOp)")
    loss.add_argument(
        "--mask-ratio", type=float, help=f"fraction of the largest products masked in the edited logit (default {d.mask_ratio})"
    )
    loss.add_argument("--reset", type=float, help=f"reset value r in cosine units (default {d.reset})")
    loss.add_argument("--target", choices=TARGETS, help=f"column edited: predicted class or label (default {d.target})")
    loss.add_argument("--ce-on", choices=CE_ON, help=f"logits the CE term uses (default {d.ce_on})")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, help=f"total epochs (default {d.epochs})")
    opt.add_argument(
        "--batch-size", type=int, help=f"images per process per micro-batch (default {d.batch_size})"
    )
    opt.add_argument(
        "--accum-steps", type=int, help=f"micro-batches per optimizer step (gradient accumulation, default {d.accum_steps})"
    )
    opt.add_argument("--optimizer", choices=OPTIMIZERS, help=f"optimizer (default {d.optimizer})")
    opt.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    opt.add_argument("--momentum", type=float, help=f"SGD momentum (default {d.momentum})")
    opt.add_argument("--weight-decay", type=float, help=f"weight decay (default {d.weight_decay})")
    opt.add_argument(
        "--warmup-epochs", type=int, help=f"epochs of linear warm-up before the cosine decay (default {d.warmup_epochs})"
    )
    opt.add_argument("--seed", type=int, help=f"seed of the few-shot sample, shuffling and augmentation (default {d.seed})")
    opt.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="autocast precision (default auto: bf16 on CUDA (fp16 where bf16 is unsupported), bf16 on CPUs with native bf16 (AMX or AVX512-BF16), else fp32)",
    )

    run_opts = p.add_argument_group("run")
    run_opts.add_argument("--out", metavar="CKPT", help="checkpoint path, written after every epoch (default with --resume: CKPT)")
    run_opts.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint of `deltakern train`")
    run_opts.add_argument("--stop-after-epochs", type=int, default=None, help="end this run after N more epochs (time-limited jobs; resume later)")
    run_opts.add_argument(
        "--export-classes", metavar="NPY", help="also write the learned class embeddings [K, D] (float32 .npy, L2-normalised)"
    )
    run_opts.add_argument("--workers", type=int, help=f"DataLoader worker processes (default {d.workers})")
    run_opts.add_argument("--device", help=DEVICE_HELP)
    run_opts.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    """The :class:`TrainConfig` of a command line; with ``--resume`` the checkpoint's settings
    filled in under the options given."""
    from dataclasses import fields

    from deltakern.prompt import TrainConfig, load_checkpoint

    given = {field: getattr(args, option) for option, field in _FIELDS.items() if getattr(args, option) is not None}
    if given.get("init", "").lower() == "none":
        given["init"] = None
    settings: dict = {}
    if args.resume is not None:
        known = {f.name for f in fields(TrainConfig)}
        settings = {k: v for k, v in load_checkpoint(args.resume)["settings"].items() if k in known}
        settings["out"] = args.resume
        settings["export_classes"] = None
    else:
        missing = [f"--{o}" for o in ("model", "train", "out") if getattr(args, o) is None]
        if missing:
            raise InvalidArgument(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required (or --resume CKPT)")
    return TrainConfig(**{**settings, **given})


def run(args: argparse.Namespace) -> int:
    import os

    from deltakern.prompt import train

    config = config_from_args(args)
    result = train(config, resume=args.resume, stop_after_epochs=args.stop_after_epochs, progress=not args.quiet)
    if not args.quiet and result.history and int(os.environ.get("RANK", "0")) == 0:
        last = result.history[-1]
        print(
            f"done: {last['epoch']} epochs, accuracy {100 * last['accuracy']:.2f}%, mean ΔEnergy "
            f"{last['mean_delta_energy']:.3f}; checkpoint {result.checkpoint}"
            + (f"; class embeddings {config.export_classes}" if config.export_classes else "")
        )
    return 0
