"""``deltakern score``: images (or encoded features) -> ΔEnergy and friends, one parquet row per image."""

from __future__ import annotations

import argparse

from deltakern.cli.options import (
    IMAGES_HELP,
    add_model_options,
    add_run_options,
    add_score_options,
    is_main_process,
    plain_warnings,
    settings_from_args,
    summary,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="score images or encoded features against class prompts into a parquet file",
        description="Stream images through an open_clip image tower (or read the feature shards of "
        "`deltakern encode`) and score every image against zero-shot class embeddings with the fused "
        "scorer. Writes OUT (parquet: id, source, pred, pred_name, delta_energy, energy, msp, "
        "max_logit, topk_indices), OUT's .manifest.json (arguments, counts, images that failed to "
        "decode, timing) and per-shard parts in OUT's .parts/ directory. Rerunning the same command "
        "resumes an interrupted run; under torchrun the shards are split across ranks and rank 0 "
        "writes the merged file.",
    )
    add_model_options(p, required=False)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help=IMAGES_HELP)
    source.add_argument(
        "--features",
        metavar="DIR",
        help="output directory of `deltakern encode` (skips decoding and the image encoder; "
        "--model/--pretrained default to the ones it was encoded with)",
    )
    classes = p.add_mutually_exclusive_group()
    classes.add_argument("--classes", metavar="FILE", help="text file with one class name per line")
    classes.add_argument("--imagenet", action="store_true", help="the 1000 ImageNet-1k class names")
    p.add_argument(
        "--templates",
        default="openai",
        help="prompt templates: 'openai' (the 80 CLIP ImageNet templates, default), 'simple' (7), "
        "'single' ('a photo of a {}.') or a text file with one template per line using {} for the class",
    )
    p.add_argument(
        "--prompts",
        metavar="CKPT",
        help="prompt-tuning checkpoint of `deltakern train`: class embeddings from the learned prompts "
        "(class names from the checkpoint, or from --classes/--imagenet when given)",
    )
    p.add_argument("--out", required=True, help="output parquet path, e.g. scores.parquet")
    add_score_options(p)
    p.add_argument(
        "--cache-dir",
        default=None,
        help="directory caching zero-shot class embeddings (default: $DELTAKERN_CACHE/classifiers, "
        "else $XDG_CACHE_HOME or ~/.cache, then deltakern/classifiers)",
    )
    neg = p.add_argument_group(
        "NegLabel (negative labels mined from a vocabulary, scored in the same run; docs/conventions.md §2.5)"
    )
    neg.add_argument(
        "--negative-labels",
        metavar="VOCAB",
        help="text file with one candidate word or phrase per line; adds a neglabel column (the log of the ID "
        "share of the softmax mass over ID plus negative labels, higher = ID)",
    )
    neg.add_argument("--n-negative", type=int, default=10_000, help="negative labels to mine (default 10000)")
    neg.add_argument(
        "--negative-groups", type=int, default=1, help="groups the negatives are split into, NegLabel's grouping (default 1)"
    )
    add_run_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    plain_warnings("score")
    from deltakern.pipeline import ScoreSettings, output_paths, run_score
    from deltakern.runtime.heap import keep_freed_memory

    keep_freed_memory()  # this process runs the encoder: keep its activations' pages between batches
    settings = settings_from_args(ScoreSettings, args)
    stats = run_score(settings, progress=not args.no_progress)
    if is_main_process():
        print(summary(stats, str(output_paths(args.out)[1])))
    return 0
