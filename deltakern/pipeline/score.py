"""``run_score``: images (or the feature shards of an encode run) -> one parquet row per image,
with the manifest beside it."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import torch

from deltakern import scoring
from deltakern.core.errors import InvalidArgument, InvalidArgumentType
from deltakern.core.validation import check_int_range
from deltakern.data.atomic import write_json
from deltakern.data.features import open_features, read_feature_shard
from deltakern.data.rundir import RunDir
from deltakern.pipeline.classes import class_embeddings, plan_classes, plan_negatives
from deltakern.pipeline.decoding import check_gpu_decode, decode_identity
from deltakern.pipeline.encode import MANIFEST_VERSION
from deltakern.pipeline.engine import (
    ShardEmbeddings,
    all_records,
    check_and_clean,
    claim,
    embed_shards,
    exclusive,
    feature_stream,
    finish,
    pending_shards,
    process_shards,
)
from deltakern.pipeline.parallelism import available_cores, choose_parallelism, torch_threads
from deltakern.pipeline.parquet import merge_parts, output_paths, scores_schema, scores_table, write_parquet_atomic
from deltakern.pipeline.settings import ScoreSettings
from deltakern.runtime import make_runtime, sum_timings


def _source(s: ScoreSettings) -> tuple[list[Any], dict[str, Any], str, str, dict[str, Any] | None]:
    """``(shards, their identity for run.json, model, pretrained, the features manifest or None)``."""
    if s.features is not None:
        feature_manifest, shards = open_features(s.features)
        encoded_with = feature_manifest["model"]
        for option, given, used in (("model", s.model, encoded_with["model"]), ("pretrained", s.pretrained, encoded_with["pretrained"])):
            if given is not None and given != used:
                raise InvalidArgument(
                    f"{option} {given!r} differs from the {used!r} the features in {s.features} were encoded with",
                    param=option,
                )
        identity = {
            "features": s.features,
            "features_fingerprint": hashlib.sha256(json.dumps(feature_manifest["shards"], sort_keys=True).encode()).hexdigest(),
        }
        return shards, identity, encoded_with["model"], encoded_with["pretrained"], feature_manifest
    from deltakern.data.images import open_source

    source = open_source(s.images)  # type: ignore[arg-type]
    identity = {"images": s.images, "images_fingerprint": source.fingerprint(), "shard_size": s.shard_size}
    return source.plan(s.shard_size), identity, s.model, s.pretrained, None  # type: ignore[return-value]


def run_score(settings: ScoreSettings, *, progress: bool = True) -> dict[str, Any]:
    """Score images (or the feature shards of an encode run) against class prompts.

    Writes ``settings.out`` (parquet, one row per image that decoded: ``id``, ``source``,
    ``pred``, ``pred_name``, ``delta_energy``, ``energy``, ``msp``, ``max_logit``,
    ``topk_indices``), the manifest beside it (``x.manifest.json``: arguments, model,
    preprocessing, classes, counts, per-shard parts, images that failed to decode, timing) and
    per-shard parts under ``x.parts/``. Scores come from :func:`deltakern.score` with the
    settings' ``c``, ``temperature``, ``reset``, ``mode`` and ``backend``. With ``features`` the
    model and weights default to those of the encode run (and must match when given).

    Everything checkable without the model is checked before it loads: the sources, the class
    names, templates and prompt checkpoint, ``c`` against the number of classes, that the output
    can be written, that no other run holds it, and that a previous run in it used the same
    arguments. Resumable and torchrun-aware (``deltakern.pipeline``). Returns this invocation's
    stats, with the whole output's totals under ``output``.
    """
    from deltakern.clip.models import check_model, load_model, weights_identity
    from deltakern.data.atomic import remove_stale_temporaries
    from deltakern.data.images import decoding_rules

    if not isinstance(settings, ScoreSettings):
        raise InvalidArgumentType(f"settings must be a ScoreSettings, got {type(settings).__name__}")
    s = settings
    out_path, manifest_path, parts_dir = output_paths(s.out)
    start = time.perf_counter()
    shards, source_args, model, pretrained, feature_manifest = _source(s)
    plan = plan_classes(classes=s.classes, imagenet=s.imagenet, templates=s.templates, prompts=s.prompts)
    c = check_int_range("c", s.c, 1, plan.count)
    negatives = plan_negatives(s, plan)
    check_model(model, pretrained)
    preprocessing = (
        None
        if feature_manifest is not None
        else decoding_rules(exif_transpose=s.exif_transpose, jpeg_draft=s.jpeg_draft, gpu_decode=s.gpu_decode)
    )

    rt = make_runtime(s.device, s.precision, s.dist_backend)
    par = choose_parallelism(available_cores(), rt.device.type, s.workers)
    parallelism = par.describe()
    run = RunDir(parts_dir, "part", ".parquet")
    what = f"the score run for {out_path}"
    try:
        if preprocessing is not None:
            check_gpu_decode(s, rt)
        chosen_backend = scoring.resolve_backend(s.backend, rt.device, c)
        args = {
            "task": "score",
            "model": model,
            "pretrained": weights_identity(pretrained),
            "seed": s.seed,
            **source_args,
            **plan.identity,
            **(negatives.identity if negatives is not None else {}),
            "c": c,
            "temperature": s.temperature,
            "reset": s.reset,
            "mode": s.mode,
            "backend": chosen_backend,
            # Named only when reduced, so runs made before the setting existed keep their identity.
            **({"matmul_precision": s.matmul_precision} if s.matmul_precision != "highest" else {}),
            "precision": rt.precision,
            "device": rt.device.type,
        }
        if preprocessing is not None:
            args["exif_transpose"] = s.exif_transpose
            args.update(decode_identity(s))

        def clean() -> None:
            remove_stale_temporaries(parts_dir)
            remove_stale_temporaries(out_path.parent, out_path.name)
            remove_stale_temporaries(out_path.parent, manifest_path.name)

        with exclusive(run, rt, what):
            check_and_clean(run, rt, args, what, clean)
            clip = load_model(model, pretrained, device=rt.device, seed=s.seed)
            W = class_embeddings(clip, plan, cache_dir=s.cache_dir, seed=s.seed, autocast_dtype=rt.autocast_dtype)
            mined = (
                negatives.mine(clip, cache_dir=s.cache_dir, seed=s.seed, autocast_dtype=rt.autocast_dtype)
                if negatives is not None
                else None
            )
            negative_kwargs = {} if mined is None else {"negatives": mined.embeddings, "negative_groups": s.negative_groups}
            claim(run, rt, args, what)
            pending, skipped = pending_shards(shards, run, rt)
            setup_s = time.perf_counter() - start

            def score_rows(X: torch.Tensor):
                if X.shape[0] == 0:
                    return None
                return scoring.score(
                    X, W, temperature=s.temperature, c=c, reset=s.reset, mode=s.mode, backend=chosen_backend,
                    matmul_precision=s.matmul_precision, **negative_kwargs,
                )

            if feature_manifest is not None:
                stream = feature_stream(pending, rt, read_feature_shard, progress)
            else:
                stream = embed_shards(
                    clip, pending, rt, batch_size=s.batch_size, workers=par.workers, progress=progress,
                    exif_transpose=s.exif_transpose, jpeg_draft=s.jpeg_draft, gpu_decode=s.gpu_decode,
                )  # fmt: skip

            def write_shard(shard: ShardEmbeddings) -> None:
                with shard.timer.section("score_s"):
                    result = score_rows(shard.embeddings)
                with shard.timer.host_section("write_s"):
                    table = scores_table(shard.ids, shard.sources, result, plan.names, c, neglabel=mined is not None)
                    write_parquet_atomic(table, run.output(shard.index))

            with torch_threads(par.torch_threads):
                stats = process_shards(stream, run, write_shard, skipped=skipped, setup_s=setup_s, start=start)

            def finalize(total: dict[str, Any]) -> dict[str, Any]:
                records = all_records(run, shards)
                merge_parts([run.output(sh.index) for sh in shards], out_path, scores_schema(c, neglabel=mined is not None))
                errors = [e for r in records for e in r["errors"]]
                images = sum(r["images"] for r in records)
                if feature_manifest is not None:
                    # the images that failed in the encode run are part of this output's story
                    errors = feature_manifest["errors"] + errors
                    images += len(feature_manifest["errors"])
                manifest = {
                    "kind": "deltakern-scores",
                    "version": MANIFEST_VERSION,
                    "output": out_path.name,
                    "args": args,
                    "model": clip.describe(),
                    "preprocessing": preprocessing if feature_manifest is None else feature_manifest.get("preprocessing"),
                    "classes": {"count": plan.count, "names": plan.names},
                    **({} if mined is None else {"negative_labels": {"count": len(mined.names), "names": mined.names,
                                                                      "groups": s.negative_groups}}),
                    "rows": sum(r["rows"] for r in records),
                    "images": images,
                    "parts": [{"index": r["index"], "file": f"{parts_dir.name}/{r['file']}", "rows": r["rows"]} for r in records],
                    "errors": errors,
                    "timing": sum_timings([r["timing"] for r in records]),
                    "parallelism": parallelism,  # this run's decode workers and torch threads
                    "last_run": total,
                }
                write_json(manifest_path, manifest)
                return {"rows": manifest["rows"], "images": images, "errors": len(errors)}

            return {**finish(rt, stats, finalize), "parallelism": parallelism}
    finally:
        rt.close()
