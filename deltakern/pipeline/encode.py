"""``run_encode``: images -> L2-normalised embedding feature shards plus ``manifest.json``."""

from __future__ import annotations

import time
from typing import Any

import torch

from deltakern.core.errors import InvalidArgumentType
from deltakern.data.atomic import write_json
from deltakern.data.rundir import RUN_FILE, RunDir
from deltakern.pipeline.decoding import check_gpu_decode, decode_identity
from deltakern.pipeline.engine import (
    ShardEmbeddings,
    all_records,
    check_and_clean,
    claim,
    embed_shards,
    exclusive,
    finish,
    pending_shards,
    process_shards,
)
from deltakern.pipeline.parallelism import available_cores, choose_parallelism, torch_threads
from deltakern.pipeline.settings import FEATURE_DTYPES, EncodeSettings
from deltakern.runtime import make_runtime, sum_timings

MANIFEST_VERSION = 1


def run_encode(settings: EncodeSettings, *, progress: bool = True) -> dict[str, Any]:
    """Encode the images of ``settings.images`` into L2-normalised feature shards under ``settings.out``.

    Writes ``out/features-{i:05d}.safetensors`` (``embeddings [n, D]`` in ``dtype``, with the
    rows' ids and sources in the header), a JSON record per shard and ``out/manifest.json``
    (model, preprocessing, shard files, counts, images that failed to decode). The images, the
    model name and tag, that ``out`` can be written and is not in use by another run, and that a
    previous run in it used the same arguments are checked before the model loads. Resumable
    and torchrun-aware (``deltakern.pipeline``). Returns this invocation's stats, with the whole
    output's totals under ``output``.
    """
    if not isinstance(settings, EncodeSettings):
        raise InvalidArgumentType(f"settings must be an EncodeSettings, got {type(settings).__name__}")
    from deltakern.clip.models import check_model, load_model, weights_identity
    from deltakern.data.atomic import remove_stale_temporaries
    from deltakern.data.features import write_feature_shard
    from deltakern.data.images import decoding_rules, open_source

    s = settings
    start = time.perf_counter()
    source = open_source(s.images)
    check_model(s.model, s.pretrained)
    shards = source.plan(s.shard_size)
    rt = make_runtime(s.device, s.precision, s.dist_backend)
    par = choose_parallelism(available_cores(), rt.device.type, s.workers)
    parallelism = par.describe()
    run = RunDir(s.out, "features", ".safetensors")
    what = f"the encode run in {run.path}"
    try:
        check_gpu_decode(s, rt)
        args = {
            "task": "encode",
            "model": s.model,
            "pretrained": weights_identity(s.pretrained),
            "seed": s.seed,
            "images": s.images,
            "images_fingerprint": source.fingerprint(),
            "shard_size": s.shard_size,
            "dtype": s.dtype,
            "precision": rt.precision,
            "device": rt.device.type,
            "exif_transpose": s.exif_transpose,
        }
        args.update(decode_identity(s))

        def clean() -> None:
            for name in ("features-*", "manifest.json", RUN_FILE):
                remove_stale_temporaries(run.path, name)

        with exclusive(run, rt, what):
            check_and_clean(run, rt, args, what, clean)
            clip = load_model(s.model, s.pretrained, device=rt.device, seed=s.seed)
            claim(run, rt, args, what)
            pending, skipped = pending_shards(shards, run, rt)
            setup_s = time.perf_counter() - start

            def write_shard(shard: ShardEmbeddings) -> None:
                X = shard.embeddings
                if X.shape[0]:
                    X = X / torch.linalg.vector_norm(X, dim=1, keepdim=True)
                with shard.timer.host_section("write_s"):
                    write_feature_shard(run.output(shard.index), X.to(FEATURE_DTYPES[s.dtype]), shard.ids, shard.sources)

            stream = embed_shards(
                clip, pending, rt, batch_size=s.batch_size, workers=par.workers, progress=progress,
                exif_transpose=s.exif_transpose, jpeg_draft=s.jpeg_draft, gpu_decode=s.gpu_decode,
            )  # fmt: skip
            with torch_threads(par.torch_threads):
                stats = process_shards(stream, run, write_shard, skipped=skipped, setup_s=setup_s, start=start)

            def finalize(total: dict[str, Any]) -> dict[str, Any]:
                records = all_records(run, shards)
                manifest = {
                    "kind": "deltakern-features",
                    "version": MANIFEST_VERSION,
                    "args": args,
                    "model": clip.describe(),
                    "preprocessing": decoding_rules(exif_transpose=s.exif_transpose, jpeg_draft=s.jpeg_draft, gpu_decode=s.gpu_decode),
                    "embed_dim": clip.embed_dim,
                    "dtype": s.dtype,
                    "normalized": True,
                    "count": sum(r["rows"] for r in records),
                    "images": sum(r["images"] for r in records),
                    "shards": [{"index": r["index"], "file": r["file"], "rows": r["rows"]} for r in records],
                    "errors": [e for r in records for e in r["errors"]],
                    "timing": sum_timings([r["timing"] for r in records]),
                    "parallelism": parallelism,  # this run's decode workers and torch threads
                    "last_run": total,
                }
                write_json(run.path / "manifest.json", manifest)
                return {"rows": manifest["count"], "images": manifest["images"], "errors": len(manifest["errors"])}

            return {**finish(rt, stats, finalize), "parallelism": parallelism}
    finally:
        rt.close()
