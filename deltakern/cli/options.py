"""Options and helpers the subcommands share: model and run options (argparse choices come from
the library's constants), the device option, run summaries, and how library errors are told
to the user in terms of the command's flags."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any

from deltakern.core.constants import BACKENDS, MATMUL_PRECISIONS, MODES, PRECISIONS

DEVICE_HELP = "cpu, cuda or cuda:N (default auto: cuda when available, cuda:LOCAL_RANK under torchrun, else cpu)"


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
    from deltakern.pipeline.parallelism import RULE_HELP

    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"DataLoader worker processes decoding images; 0 decodes in the main process ({RULE_HELP}; "
        "the choice is recorded in the manifest's parallelism)",
    )
    p.add_argument(
        "--device", default="auto", help=DEVICE_HELP
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="encoder autocast precision (default auto: bf16 on CUDA (fp16 where bf16 is unsupported), bf16 on CPUs with native bf16 (AMX or AVX512-BF16), else fp32)",
    )
    p.add_argument(
        "--dist-backend",
        choices=("gloo", "nccl"),
        default=None,
        help="torch.distributed backend under torchrun (default: nccl on CUDA, gloo on CPU)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--no-exif-transpose",
        dest="exif_transpose",
        action="store_false",
        help="keep images as stored instead of applying their EXIF orientation tag (applied by default)",
    )
    p.add_argument(
        "--jpeg-draft",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decode JPEGs of at least twice the model's input size at 1/2, 1/4 or 1/8 scale in the DCT domain, "
        "never below the input size on either side, before the model's own resize and crop (default on: several "
        "times faster on large photos; it changes the pixels slightly, so a resumed run must keep the same choice)",
    )
    p.add_argument(
        "--gpu-decode",
        action="store_true",
        help="CUDA runs: decode JPEG files in batches on the GPU (nvJPEG) and resize them there; other formats, and "
        "JPEGs nvJPEG refuses, are decoded on the CPU (default off: the GPU resize differs slightly from PIL's)",
    )


def add_score_options(p: argparse.ArgumentParser, *, c_help: str = "number of top classes ΔEnergy resets (default 1)") -> None:
    """--c/--temperature/--reset/--mode/--backend/--matmul-precision of :func:`deltakern.score`."""
    p.add_argument("--c", type=int, default=1, help=c_help)
    p.add_argument("--temperature", type=float, default=0.01, help="softmax temperature τ (default 0.01 = logit scale 100)")
    p.add_argument("--reset", type=float, default=0.0, help="cosine value the top-c logits are reset to (default 0.0)")
    p.add_argument("--mode", choices=MODES, default=MODES[0], help=f"ΔEnergy mode (default {MODES[0]})")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="scoring backend (default auto: triton on CUDA, the C++ kernel on CPU, else the reference)",
    )
    p.add_argument("--matmul-precision", choices=MATMUL_PRECISIONS, default="highest", help=MATMUL_PRECISION_HELP)


MATMUL_PRECISION_HELP = (
    "float32 products, as torch.set_float32_matmul_precision: highest (default, float32 accuracy); "
    "high/medium allow TF32 on CUDA and bf16 GEMMs on CPUs with native bf16 (faster, cosines within ~1e-3/8e-3)"
)


def is_main_process() -> bool:
    """True on torchrun's rank 0 (or without torchrun): the process that prints summaries."""
    return int(os.environ.get("RANK", "0")) == 0


def plain_warnings(command: str) -> None:
    """Show warnings as one ``deltakern COMMAND: warning: ...`` line each, once per message and
    only on the main process (no source file and line: they point inside the library)."""
    from deltakern.clip.models import RandomWeightsWarning

    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001
        text = f"deltakern {command}: warning: {message}"
        if text not in seen:
            seen.add(text)
            print(text, file=sys.stderr if file is None else file)

    warnings.showwarning = show
    if not is_main_process():
        warnings.filterwarnings("ignore", category=RandomWeightsWarning)


def summary(stats: dict, manifest: str) -> str:
    """One line about a finished run: the output's totals, then what this run added.

    ``stats`` is what :func:`deltakern.pipeline.run_score` / ``run_encode`` return; ``output``
    holds the totals of the whole output (all runs that built it)."""
    out = stats.get("output") or {"rows": stats["rows"], "images": stats["images"], "errors": stats["errors"]}
    totals = f"{out['rows']} rows from {out['images']} images ({out['errors']} failed to decode)"
    if stats["shards_done_now"] == 0:
        return f"already complete: {totals}; nothing left to do; manifest: {manifest}"
    speed = f"in {stats['wall_s']:.1f} s, {stats['images_per_s']:.1f} images/s"
    if stats["shards_skipped"] == 0:
        return f"{totals} {speed}, {stats['shards_done_now']} shards; manifest: {manifest}"
    return (
        f"{totals}; this run added {stats['rows']} rows from {stats['images']} images in {stats['shards_done_now']} "
        f"shards ({stats['shards_skipped']} were already done) {speed}; manifest: {manifest}"
    )


def settings_from_args(cls: type, args: argparse.Namespace) -> Any:
    """A pipeline settings object (``EncodeSettings``, ``ScoreSettings``) from the parsed flags:
    every field of ``cls`` takes the value of the flag of the same name (``--shard-size`` ->
    ``shard_size``), so a new setting needs only its flag and its field."""
    import dataclasses

    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


TEMPLATES_HELP = (
    "prompt templates: 'openai' (the 80 CLIP ImageNet templates, default), 'simple' (7), "
    "'single' ('a photo of a {}.') or a text file with one template per line using {} for the class"
)
CACHE_DIR_HELP = (
    "directory caching zero-shot class embeddings and mined negative labels (default: $DELTAKERN_CACHE/classifiers, "
    "else $XDG_CACHE_HOME or ~/.cache, then deltakern/classifiers)"
)


def add_text_prompt_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--templates and --cache-dir: how class names become cached text embeddings (the same
    presets, default and cache as ``deltakern score``)."""
    p.add_argument("--templates", default="openai", help=TEMPLATES_HELP)
    p.add_argument("--cache-dir", default=None, help=CACHE_DIR_HELP)
