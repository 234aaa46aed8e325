"""``deltakern encode``: images -> L2-normalised embedding feature shards + manifest.json."""

from __future__ import annotations

import argparse

from deltakern.cli.options import (
    IMAGES_HELP,
    add_model_options,
    add_run_options,
    is_main_process,
    plain_warnings,
    settings_from_args,
    summary,
)


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
    from deltakern.pipeline.settings import FEATURE_DTYPES

    add_model_options(p)
    p.add_argument("--images", required=True, help=IMAGES_HELP)
    p.add_argument("--out", required=True, help="output directory for the feature shards and manifest.json")
    p.add_argument(
        "--dtype",
        choices=tuple(FEATURE_DTYPES),
        default="float16",
        help="storage dtype of the embeddings (default float16)",
    )
    add_run_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    plain_warnings("encode")
    from deltakern.pipeline import EncodeSettings, run_encode
    from deltakern.runtime.heap import keep_freed_memory

    keep_freed_memory()  # this process runs the encoder: keep its activations' pages between batches
    settings = settings_from_args(EncodeSettings, args)
    stats = run_encode(settings, progress=not args.no_progress)
    if is_main_process():
        print(summary(stats, f"{args.out}/manifest.json"))
    return 0
