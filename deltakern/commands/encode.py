"""``deltakern encode``: images -> L2-normalised embedding feature shards + manifest.json."""

from __future__ import annotations

import argparse
import os

IMAGES_HELP = (
    "images to read: a folder (searched recursively for .jpg/.png/.webp/... files), a file list "
    "(.txt one path per line, or .csv/.tsv with a 'path' column and optional 'id' column; relative "
    "paths are relative to the list), or webdataset tar shards, e.g. 'shards/{0000..0099}.tar'"
)


def add_model_options(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    """--model/--pretrained/--seed, shared by encode and score."""
    p.add_argument(
        "--model",
        required=required,
        help="open_clip architecture, e.g. ViT-B-32 (see open_clip.list_models()), or deltakern-tiny, "
        "a small random-weight model for tests",
    )
    p.add_argument(
        "--pretrained",
        required=required,
        help="open_clip pretrained tag (e.g. openai, laion2b_s34b_b79k), a local checkpoint file, or "
        "'none' for random weights (testing only)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights of --pretrained none (default 0)")


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Sharding, batching, device and precision options, shared by encode and score."""
    p.add_argument(
        "--shard-size",
        type=int,
        default=10_000,
        help="images per work shard (default 10000); finished shards are skipped when a run is "
        "resumed; webdataset sources use one shard per tar",
    )
    p.add_argument("--batch-size", type=int, default=256, help="images per encoder batch (default 256)")
    p.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="DataLoader worker processes decoding images (default: min(8, CPU count); 0 decodes in the main process)",
    )
    p.add_argument(
        "--device", default="auto", help="cpu, cuda or cuda:N (default auto: cuda:LOCAL_RANK when available, else cpu)"
    )
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="encoder autocast precision (default auto: bf16 on CUDA, fp16 where bf16 is unsupported, fp32 on CPU)",
    )
    p.add_argument(
        "--dist-backend",
        choices=("gloo", "nccl"),
        default=None,
        help="torch.distributed backend under torchrun (default: nccl on CUDA, gloo on CPU)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "encode",
        help="encode images into embedding feature shards (to score them again without the encoder)",
        description="Encode images with an open_clip image tower into L2-normalised feature shards "
        "(OUT/features-NNNNN.safetensors, float16 by default) and OUT/manifest.json (model, "
        "preprocessing, shard files, counts, images that failed to decode). Rerunning the same "
        "command resumes an interrupted run; under torchrun the shards are split across ranks. "
        "Score the result with `deltakern score --features OUT`.",
    )
    add_model_options(p)
    p.add_argument("--images", required=True, help=IMAGES_HELP)
    p.add_argument("--out", required=True, help="output directory for the feature shards and manifest.json")
    p.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        default="float16",
        help="storage dtype of the embeddings (default float16)",
    )
    add_run_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..pipeline import run_encode

    stats = run_encode(
        model=args.model,
        pretrained=args.pretrained,
        images=args.images,
        out=args.out,
        dtype=args.dtype,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        precision=args.precision,
        seed=args.seed,
        progress=not args.no_progress,
        dist_backend=args.dist_backend,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary(stats, f"{args.out}/manifest.json"))
    return 0


def summary(stats: dict, manifest: str) -> str:
    """One line about a finished run."""
    return (
        f"{stats['rows']} rows from {stats['images']} images ({stats['errors']} failed to decode) in "
        f"{stats['wall_s']:.1f} s, {stats['images_per_s']:.1f} images/s; "
        f"{stats['shards_done_now']} shards done now, {stats['shards_skipped']} already done; manifest: {manifest}"
    )
