"""``run_encode``: images -> L2-normalised embedding feature shards plus ``manifest.json``."""

from __future__ import annotations

import time
from typing import Any

import torch

from deltakern.core.errors import InvalidArgumentType
from deltakern.data.atomic import write_json
from deltakern.data.rundir import RunDir
from deltakern.pipeline.engine import (
    ShardEmbeddings,
    all_records,
    claim,
    embed_shards,
    finish,
    pending_shards,
    process_shards,
)
from deltakern.pipeline.settings import FEATURE_DTYPES, EncodeSettings
from deltakern.runtime import make_runtime, sum_timings

MANIFEST_VERSION = 1


def run_encode(settings: EncodeSettings, *, progress: bool = True) -> dict[str, Any]:
    """Encode the images of ``settings.images`` into L2-normalised feature shards under ``settings.out``.

    Writes ``out/features-{i:05d}.safetensors`` (``embeddings [n, D]`` in ``dtype``, with the
    rows' ids and sources in the header), a JSON record per shard and ``out/manifest.json``
    (model, preprocessing, shard files, counts, images that failed to decode). Resumable and
    torchrun-aware (``deltakern.pipeline``). Returns this invocation's stats.
    """
    if not isinstance(settings, EncodeSettings):
        raise InvalidArgumentType(f"settings must be an EncodeSettings, got {type(settings).__name__}")
    from deltakern.clip.models import load_model
    from deltakern.data.features import write_feature_shard
    from deltakern.data.images import open_source

    s = settings
    start = time.perf_counter()
    source = open_source(s.images)
    rt = make_runtime(s.device, s.precision, s.dist_backend)
    try:
        clip = load_model(s.model, s.pretrained, device=rt.device, seed=s.seed)
        shards = source.plan(s.shard_size)
        run = RunDir(s.out, "features", ".safetensors")
        args = {
            "task": "encode",
            "model": s.model,
            "pretrained": clip.describe()["weights"],
            "seed": s.seed,
            "images": s.images,
            "images_fingerprint": source.fingerprint(),
            "shard_size": s.shard_size,
            "dtype": s.dtype,
            "precision": rt.precision,
            "device": rt.device.type,
        }
        claim(run, rt, args, "the encode run")
        pending, skipped = pending_shards(shards, run, rt)
        setup_s = time.perf_counter() - start

        def write_shard(shard: ShardEmbeddings) -> None:
            X = shard.embeddings
            if X.shape[0]:
                X = X / torch.linalg.vector_norm(X, dim=1, keepdim=True)
            with shard.timer.host_section("write_s"):
                write_feature_shard(run.output(shard.index), X.to(FEATURE_DTYPES[s.dtype]), shard.ids, shard.sources)

        stream = embed_shards(clip, pending, rt, batch_size=s.batch_size, workers=s.workers, progress=progress)
        stats = process_shards(stream, run, write_shard, skipped=skipped, setup_s=setup_s, start=start)

        def finalize(total: dict[str, Any]) -> dict[str, Any]:
            records = all_records(run, shards)
            manifest = {
                "kind": "deltakern-features",
                "version": MANIFEST_VERSION,
                "args": args,
                "model": clip.describe(),
                "embed_dim": clip.embed_dim,
                "dtype": s.dtype,
                "normalized": True,
                "count": sum(r["rows"] for r in records),
                "images": sum(r["images"] for r in records),
                "shards": [{"index": r["index"], "file": r["file"], "rows": r["rows"]} for r in records],
                "errors": [e for r in records for e in r["errors"]],
                "timing": sum_timings([r["timing"] for r in records]),
                "last_run": total,
            }
            write_json(run.path / "manifest.json", manifest)
            return manifest

        return finish(rt, stats, finalize)
    finally:
        rt.close()


