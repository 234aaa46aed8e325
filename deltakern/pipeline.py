"""Streaming encode -> score -> write: resumable, crash-safe, sharded across torchrun ranks.

Two jobs share one engine:

- :func:`run_encode` writes image embeddings as feature shards (safetensors, float16 by
  default) plus ``manifest.json``;
- :func:`run_score` writes one parquet row per image (id, source, predicted class, ΔEnergy,
  energy, MSP, max-logit, top-c class indices) plus a manifest, from images or from feature
  shards.

How a run survives crashes: the input is cut into fixed shards (:meth:`ImageSource.plan`). Each
finished shard's output is written to a temporary file and renamed into place, then a small
JSON record of it is written the same way; a shard is done exactly when its record exists. A
rerun with the same arguments skips done shards, so the final output has no lost and no
duplicated rows and is identical to that of an uninterrupted run. The arguments that shape the
output are stored in ``run.json`` on the first run; a rerun with different ones is refused.

Under ``torchrun`` (``WORLD_SIZE > 1``; gloo on CPU, nccl on CUDA) shard ``i`` belongs to rank
``i % world_size``. Each rank writes its own shards; after all ranks are done (a collective
that doubles as the barrier) rank 0 merges the parts in shard order and writes the manifest, so
the result equals the single-process one.

Timing: the returned stats (and the manifest's ``timing``) split the work into ``decode_s``
(worker seconds reading, decoding and preprocessing, summed over workers), ``data_wait_s``
(seconds the main process waited for decoded batches), ``encode_s``, ``score_s`` and
``write_s``; ``setup_s`` is the time spent before streaming starts (loading the model,
building the class embeddings, listing the images) and ``images_per_s`` is images over the
streaming seconds (``wall_s - setup_s``, slowest rank).

Testing hook: ``DELTAKERN_FAULT_EXIT_AFTER_SHARDS=N`` makes the process exit abruptly
(``os._exit``) right after it has recorded N shards, which is how the tests simulate a job
dying mid-run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ._validation import check_choice, check_finite_number, check_int_range, check_positive
from ._atomic import atomic_path, write_json
from .rundir import RunDir, read_json
from .runtime import TIMING_KEYS, Runtime, SectionTimer, make_runtime, sum_timings  # noqa: F401 - TIMING_KEYS names the manifest's timing fields

FEATURE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FAULT_ENV = "DELTAKERN_FAULT_EXIT_AFTER_SHARDS"
MANIFEST_VERSION = 1


# ---- encoding images, shard by shard ------------------------------------------------------------


@dataclass
class ShardEmbeddings:
    """A shard's decoded-and-encoded images: embeddings of the images that decoded, in order."""

    index: int
    ids: list[str]
    sources: list[str]
    embeddings: torch.Tensor  # [n_ok, D] float32 on the runtime device
    errors: list[dict[str, str]]
    images: int  # images attempted (decoded + failed)
    timer: SectionTimer = field(repr=False)


def embed_shards(
    clip: Any,
    shards: Sequence[Any],
    rt: Runtime,
    *,
    batch_size: int,
    workers: int,
    progress: bool,
) -> Iterator[ShardEmbeddings]:
    """Decode (DataLoader workers) and encode the images of ``shards``, yielding shard by shard.

    One DataLoader spans all shards, so workers keep prefetching across shard boundaries; no
    batch spans two shards. Images that fail to decode are reported in ``errors``.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from .data import DecodeDataset, collate_decoded, shard_batches

    if not shards:
        return
    items_per_shard = [s.list_items() for s in shards]
    flat = [item for items in items_per_shard for item in items]
    loader = DataLoader(
        DecodeDataset(flat, clip.preprocess),
        batch_sampler=shard_batches([len(items) for items in items_per_shard], batch_size),
        num_workers=workers,
        collate_fn=collate_decoded,
        pin_memory=rt.device.type == "cuda",
    )
    bar = tqdm(
        total=len(flat),
        unit="img",
        desc=f"rank {rt.rank}" if rt.world_size > 1 else "images",
        disable=not progress or rt.rank != 0,
        dynamic_ncols=True,
    )
    batches = iter(loader)
    with bar:
        for shard, items in zip(shards, items_per_shard, strict=True):
            timer = SectionTimer(rt.device)
            chunks, ok, errors = [], [], []
            for _ in range(math.ceil(len(items) / batch_size)):
                t0 = time.perf_counter()
                batch = next(batches)
                timer.add("data_wait_s", time.perf_counter() - t0)
                timer.add("decode_s", batch.decode_s)
                for position, error in batch.failed:
                    bad = flat[position]
                    errors.append({"id": bad.id, "source": bad.source, "error": error})
                if batch.images is not None:
                    with timer.section("encode_s"), rt.autocast():
                        images = batch.images.to(rt.device, non_blocking=True)
                        chunks.append(clip.model.encode_image(images).float())
                    ok.extend(batch.positions.tolist())
                bar.update(len(batch.positions) + len(batch.failed))
            bar.set_postfix(shard=shard.index, refresh=False)
            embeddings = torch.cat(chunks) if chunks else torch.empty(0, clip.embed_dim, device=rt.device)
            yield ShardEmbeddings(
                index=shard.index,
                ids=[flat[p].id for p in ok],
                sources=[flat[p].source for p in ok],
                embeddings=embeddings,
                errors=errors,
                images=len(items),
                timer=timer,
            )


def _fault_hook(done_now: int) -> None:
    limit = os.environ.get(FAULT_ENV)
    if limit and done_now >= int(limit):
        os._exit(75)  # abrupt, like a killed job: no cleanup, no flushing


def _process_shards(
    stream: Iterator[ShardEmbeddings],
    run: RunDir,
    write_shard: Callable[[ShardEmbeddings], None],
    *,
    skipped: int,
    setup_s: float,
    start: float,
) -> dict[str, Any]:
    """Write each streamed shard's output, then its record (the shard is done exactly when the
    record exists); return this run's stats: counts, summed timings, setup and wall seconds."""
    timings: list[dict[str, float]] = []
    n_images = n_rows = n_errors = 0
    with torch.inference_mode():
        for done_now, shard in enumerate(stream, 1):
            write_shard(shard)
            timing = shard.timer.totals()
            run.write_record(
                shard.index,
                {
                    "index": shard.index,
                    "file": run.output(shard.index).name,
                    "rows": len(shard.ids),
                    "images": shard.images,
                    "errors": shard.errors,
                    "timing": timing,
                },
            )
            timings.append(timing)
            n_images, n_rows, n_errors = n_images + shard.images, n_rows + len(shard.ids), n_errors + len(shard.errors)
            _fault_hook(done_now)
    return {
        "images": n_images,
        "rows": n_rows,
        "errors": n_errors,
        "shards_done_now": len(timings),
        "shards_skipped": skipped,
        "setup_s": setup_s,
        "wall_s": time.perf_counter() - start,
        **sum_timings(timings),
    }


def _pending(shards: Sequence[Any], run: RunDir, rt: Runtime) -> tuple[list[Any], int]:
    """This rank's shards (``index % world_size == rank``) not yet done, and how many are done."""
    mine = [s for s in shards if s.index % rt.world_size == rt.rank]
    pending = [s for s in mine if not run.is_done(s.index)]
    return pending, len(mine) - len(pending)


def _finish(rt: Runtime, stats: dict[str, Any], finalize: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """Gather every rank's stats (the barrier), let rank 0 write the final outputs."""
    all_stats = rt.gather(stats)
    total = {
        "images": sum(s["images"] for s in all_stats),
        "rows": sum(s["rows"] for s in all_stats),
        "errors": sum(s["errors"] for s in all_stats),
        "shards_done_now": sum(s["shards_done_now"] for s in all_stats),
        "shards_skipped": sum(s["shards_skipped"] for s in all_stats),
        "setup_s": max(s["setup_s"] for s in all_stats),
        "wall_s": max(s["wall_s"] for s in all_stats),
        "world_size": rt.world_size,
        **sum_timings(all_stats),
    }
    streaming_s = max(s["wall_s"] - s["setup_s"] for s in all_stats)
    total["images_per_s"] = total["images"] / streaming_s if streaming_s > 0 else 0.0
    message = None
    if rt.rank == 0:
        try:
            finalize(total)
        except Exception as exc:  # tell the other ranks instead of leaving them waiting
            message = f"{type(exc).__name__}: {exc}"
            rt.broadcast(message)
            raise
    message = rt.broadcast(message)
    if message is not None:
        raise RuntimeError(f"rank 0 failed to write the final output: {message}")
    return total


def _claim(run: RunDir, rt: Runtime, args: dict[str, Any], what: str) -> None:
    message = run.claim(args, what) if rt.rank == 0 else None
    message = rt.broadcast(message)
    if message is not None:
        raise ValueError(message)


# ---- encode --------------------------------------------------------------------------------------


def run_encode(
    *,
    model: str,
    pretrained: str,
    images: str,
    out: str | os.PathLike,
    dtype: str = "float16",
    shard_size: int = 10_000,
    batch_size: int = 256,
    workers: int = 4,
    device: str = "auto",
    precision: str = "auto",
    seed: int = 0,
    progress: bool = True,
    dist_backend: str | None = None,
) -> dict[str, Any]:
    """Encode the images of ``images`` into L2-normalised feature shards under ``out``.

    Writes ``out/features-{i:05d}.safetensors`` (``embeddings [n, D]`` in ``dtype``, with the
    rows' ids and sources in the header), a JSON record per shard and ``out/manifest.json``
    (model, preprocessing, shard files, counts, images that failed to decode). Resumable and
    torchrun-aware as described in the module docstring. Returns this invocation's stats.
    """
    from .clip_models import load_model
    from .data import open_source, write_feature_shard

    check_choice("dtype", dtype, FEATURE_DTYPES)
    shard_size = check_int_range("shard_size", shard_size, 1, 1 << 40)
    batch_size = check_int_range("batch_size", batch_size, 1, 1 << 20)
    workers = check_int_range("workers", workers, 0, 1024)
    start = time.perf_counter()
    source = open_source(images)
    rt = make_runtime(device, precision, dist_backend)
    try:
        clip = load_model(model, pretrained, device=rt.device, seed=seed)
        shards = source.plan(shard_size)
        run = RunDir(out, "features", ".safetensors")
        args = {
            "task": "encode",
            "model": model,
            "pretrained": clip.describe()["weights"],
            "seed": seed,
            "images": images,
            "images_fingerprint": source.fingerprint(),
            "shard_size": shard_size,
            "dtype": dtype,
            "precision": rt.precision,
            "device": rt.device.type,
        }
        _claim(run, rt, args, "the encode run")
        pending, skipped = _pending(shards, run, rt)
        setup_s = time.perf_counter() - start
        def write_shard(shard: ShardEmbeddings) -> None:
            X = shard.embeddings
            if X.shape[0]:
                X = X / torch.linalg.vector_norm(X, dim=1, keepdim=True)
            with shard.timer.host_section("write_s"):
                write_feature_shard(run.output(shard.index), X.to(FEATURE_DTYPES[dtype]), shard.ids, shard.sources)

        stream = embed_shards(clip, pending, rt, batch_size=batch_size, workers=workers, progress=progress)
        stats = _process_shards(stream, run, write_shard, skipped=skipped, setup_s=setup_s, start=start)

        def finalize(total: dict[str, Any]) -> dict[str, Any]:
            records = _all_records(run, shards)
            manifest = {
                "kind": "deltakern-features",
                "version": MANIFEST_VERSION,
                "args": args,
                "model": clip.describe(),
                "embed_dim": clip.embed_dim,
                "dtype": dtype,
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

        return _finish(rt, stats, finalize)
    finally:
        rt.close()


def _all_records(run: RunDir, shards: Sequence[Any]) -> list[dict[str, Any]]:
    missing = [s.index for s in shards if not run.is_done(s.index)]
    if missing:
        raise RuntimeError(f"shards {missing[:10]} of {run.path} are not finished; rerun to complete them")
    return [run.record(s.index) for s in shards]


# ---- score ---------------------------------------------------------------------------------------


@dataclass
class FeatureShard:
    """A feature shard of an encode run, as a unit of scoring work."""

    index: int
    path: Path


def open_features(directory: str | os.PathLike) -> tuple[dict[str, Any], list[FeatureShard]]:
    """The manifest and shards of a finished :func:`run_encode` output directory."""
    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(
            f"features must be a directory written by `deltakern encode` (with manifest.json), "
            f"got {str(directory)!r} ({'no manifest.json: is the encode run finished?' if directory.is_dir() else 'not a directory'})"
        )
    manifest = read_json(manifest_path)
    if manifest.get("kind") != "deltakern-features":
        raise ValueError(f"features: {manifest_path} is not a deltakern features manifest")
    return manifest, [FeatureShard(index=s["index"], path=directory / s["file"]) for s in manifest["shards"]]


def class_embeddings(
    clip: Any,
    *,
    classes: str | None = None,
    imagenet: bool = False,
    templates: str = "openai",
    prompts: str | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, list[str], dict[str, Any]]:
    """``(W [K, D] float32 on the model's device, class names, identity of W for run.json)``.

    Class names come from ``classes`` (a text file, one name per line) or ImageNet-1k.
    ``templates`` is a preset (``openai``, ``simple``, ``single``) or a text file with one
    template per line. With ``prompts`` (a prompt-tuning checkpoint of ``deltakern train``) the
    class embeddings come from the learned prompts instead, and class names are optional.
    """
    from . import zeroshot
    from .clip_models import weights_identity

    if classes is not None and imagenet:
        raise ValueError("give either --classes FILE or --imagenet, not both")
    names: list[str] | None = None
    if classes is not None:
        names = read_lines(classes, "classes")
    elif imagenet:
        names = list(zeroshot.imagenet_classnames())
    if prompts is not None:
        W, saved_names = _prompt_class_embeddings(prompts, clip)
        names = names or saved_names or [f"class_{k}" for k in range(W.shape[0])]
        if len(names) != W.shape[0]:
            raise ValueError(f"--prompts {prompts} gives {W.shape[0]} classes but the class names list {len(names)}")
        identity = {"prompts": weights_identity(prompts), "classnames_sha256": zeroshot.classnames_hash(names)}
        return W.float(), names, identity
    if names is None:
        raise ValueError("class names are needed: give --classes FILE, --imagenet or --prompts CKPT")
    template_list = (
        zeroshot.template_preset(templates) if templates in zeroshot.TEMPLATE_PRESETS else read_lines(templates, "templates")
    )
    W = zeroshot.cached_class_embeddings(
        clip, names, template_list, cache_dir=cache_dir, seed=seed, autocast_dtype=autocast_dtype
    )
    identity = {
        "classnames_sha256": zeroshot.classnames_hash(names),
        "templates_sha256": zeroshot.templates_hash(template_list),
    }
    return W, names, identity


def read_lines(path: str, what: str) -> list[str]:
    """Non-empty, stripped lines of a text file (``#`` starts a comment line)."""
    if not os.path.isfile(path):
        raise ValueError(f"--{what} must be a text file with one entry per line, got {path!r} (no such file)")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise ValueError(f"--{what} file {path} is empty")
    return lines


def _prompt_class_embeddings(path: str, clip: Any) -> tuple[torch.Tensor, list[str] | None]:
    """Class embeddings from a prompt checkpoint, and the class names it stores (if readable)."""
    try:
        from . import train
    except ModuleNotFoundError as exc:
        if exc.name != "deltakern.train":
            raise
        train = None
    load = getattr(train, "class_embeddings_from_checkpoint", None)
    if load is None:
        raise ValueError(
            "--prompts needs deltakern.train.class_embeddings_from_checkpoint, which this installation lacks"
        )
    if not os.path.isfile(path):
        raise ValueError(f"--prompts must be a prompt-tuning checkpoint file, got {path!r} (no such file)")
    W = load(path, clip.model, clip.tokenizer, clip.device)
    names = None
    read_checkpoint = getattr(train, "load_checkpoint", None)
    if read_checkpoint is not None:
        names = read_checkpoint(path).get("classnames")
    return W, list(names) if names else None


def scores_schema(c: int):
    """The parquet schema of ``deltakern score`` output for top-``c`` indices."""
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("source", pa.string()),
            ("pred", pa.int64()),
            ("pred_name", pa.string()),
            ("delta_energy", pa.float32()),
            ("energy", pa.float32()),
            ("msp", pa.float32()),
            ("max_logit", pa.float32()),
            ("topk_indices", pa.list_(pa.int64(), c)),
        ]
    )


def scores_table(ids: Sequence[str], sources: Sequence[str], result: Any, names: Sequence[str], c: int):
    """One shard's rows as a pyarrow table (``result`` is a :class:`deltakern.Scores` or None)."""
    import numpy as np
    import pyarrow as pa

    schema = scores_schema(c)
    if result is None:
        return schema.empty_table()
    host = {k: v.cpu().numpy() for k, v in result.as_dict().items()}
    pred = host["pred"].astype(np.int64)
    topk = pa.FixedSizeListArray.from_arrays(pa.array(host["topk_indices"].reshape(-1).astype(np.int64)), c)
    columns = [
        pa.array(list(ids), pa.string()),
        pa.array(list(sources), pa.string()),
        pa.array(pred),
        pa.array([names[k] for k in pred], pa.string()),
        *(pa.array(host[k].astype(np.float32)) for k in ("delta_energy", "energy", "msp", "max_logit")),
        topk,
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _write_parquet_atomic(table: Any, path: Path) -> None:
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def merge_parts(parts: Sequence[Path], out: Path, schema: Any) -> None:
    """Concatenate parquet parts in order into ``out`` (atomically), one part in memory at a time."""
    import pyarrow.parquet as pq

    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for part in parts:
            writer.write_table(pq.read_table(part, schema=schema))


def output_paths(out: str | os.PathLike) -> tuple[Path, Path, Path]:
    """``(parquet, manifest, parts directory)`` of a score run: ``x.parquet``,
    ``x.manifest.json`` and ``x.parts/``."""
    out = Path(out)
    if out.suffix != ".parquet":
        raise ValueError(f"out must be a path ending in .parquet, got {str(out)!r}")
    return out, out.with_suffix(".manifest.json"), out.with_suffix(".parts")


def run_score(
    *,
    out: str | os.PathLike,
    model: str | None = None,
    pretrained: str | None = None,
    images: str | None = None,
    features: str | None = None,
    classes: str | None = None,
    imagenet: bool = False,
    templates: str = "openai",
    prompts: str | None = None,
    c: int = 1,
    temperature: float = 0.01,
    reset: float = 0.0,
    mode: str = "separate",
    backend: str = "auto",
    shard_size: int = 10_000,
    batch_size: int = 256,
    workers: int = 4,
    device: str = "auto",
    precision: str = "auto",
    seed: int = 0,
    cache_dir: str | None = None,
    progress: bool = True,
    dist_backend: str | None = None,
) -> dict[str, Any]:
    """Score images (or the feature shards of an encode run) against class prompts.

    Writes ``out`` (parquet, one row per image that decoded: ``id``, ``source``, ``pred``,
    ``pred_name``, ``delta_energy``, ``energy``, ``msp``, ``max_logit``, ``topk_indices``), the
    manifest beside it (``x.manifest.json``: arguments, model, classes, counts, per-shard parts,
    images that failed to decode, timing) and per-shard parts under ``x.parts/``. Scores come
    from :func:`deltakern.score` with ``c``, ``temperature``, ``reset``, ``mode`` and ``backend``.
    With ``features`` the model and weights default to those of the encode run (and must match
    when given). Resumable and torchrun-aware (module docstring). Returns this invocation's stats.
    """
    from . import scoring
    from .clip_models import load_model
    from .data import open_source, read_feature_shard

    if (images is None) == (features is None):
        raise ValueError("give exactly one of --images SRC or --features DIR")
    out_path, manifest_path, parts_dir = output_paths(out)
    c = check_int_range("c", c, 1, 1 << 20)
    temperature = check_positive("temperature", temperature)
    reset = check_finite_number("reset", reset)
    check_choice("mode", mode, scoring.MODES)
    check_choice("backend", backend, scoring.BACKENDS)
    shard_size = check_int_range("shard_size", shard_size, 1, 1 << 40)
    batch_size = check_int_range("batch_size", batch_size, 1, 1 << 20)
    workers = check_int_range("workers", workers, 0, 1024)
    start = time.perf_counter()

    source_args: dict[str, Any]
    if features is not None:
        feature_manifest, shards = open_features(features)
        encoded_with = feature_manifest["model"]
        for option, given, used in (("model", model, encoded_with["model"]), ("pretrained", pretrained, encoded_with["pretrained"])):
            if given is not None and given != used:
                raise ValueError(f"--{option} {given!r} differs from the {used!r} the features in {features} were encoded with")
        model, pretrained = encoded_with["model"], encoded_with["pretrained"]
        source_args = {
            "features": str(features),
            "features_fingerprint": hashlib.sha256(json.dumps(feature_manifest["shards"], sort_keys=True).encode()).hexdigest(),
        }
    else:
        if model is None or pretrained is None:
            raise ValueError("--model and --pretrained are required with --images")
        source = open_source(images)  # type: ignore[arg-type]
        shards = source.plan(shard_size)
        source_args = {"images": images, "images_fingerprint": source.fingerprint(), "shard_size": shard_size}

    rt = make_runtime(device, precision, dist_backend)
    try:
        clip = load_model(model, pretrained, device=rt.device, seed=seed)
        W, names, class_identity = class_embeddings(
            clip,
            classes=classes,
            imagenet=imagenet,
            templates=templates,
            prompts=prompts,
            cache_dir=cache_dir,
            seed=seed,
            autocast_dtype=rt.autocast_dtype,
        )
        c = check_int_range("c", c, 1, W.shape[0])
        chosen_backend = scoring.resolve_backend(backend, rt.device, c)
        args = {
            "task": "score",
            "model": model,
            "pretrained": clip.describe()["weights"],
            "seed": seed,
            **source_args,
            **class_identity,
            "c": c,
            "temperature": temperature,
            "reset": reset,
            "mode": mode,
            "backend": chosen_backend,
            "precision": rt.precision,
            "device": rt.device.type,
        }
        run = RunDir(parts_dir, "part", ".parquet")
        _claim(run, rt, args, f"the score run for {out_path}")
        pending, skipped = _pending(shards, run, rt)
        setup_s = time.perf_counter() - start

        def score_rows(X: torch.Tensor):
            if X.shape[0] == 0:
                return None
            return scoring.score(X, W, temperature=temperature, c=c, reset=reset, mode=mode, backend=chosen_backend)

        if features is not None:
            stream = _feature_stream(pending, rt, read_feature_shard, progress)
        else:
            stream = embed_shards(clip, pending, rt, batch_size=batch_size, workers=workers, progress=progress)
        def write_shard(shard: ShardEmbeddings) -> None:
            with shard.timer.section("score_s"):
                result = score_rows(shard.embeddings)
            with shard.timer.host_section("write_s"):
                _write_parquet_atomic(scores_table(shard.ids, shard.sources, result, names, c), run.output(shard.index))

        stats = _process_shards(stream, run, write_shard, skipped=skipped, setup_s=setup_s, start=start)

        def finalize(total: dict[str, Any]) -> dict[str, Any]:
            records = _all_records(run, shards)
            merge_parts([run.output(s.index) for s in shards], out_path, scores_schema(c))
            errors = [e for r in records for e in r["errors"]]
            if features is not None:
                errors = feature_manifest["errors"] + errors
            manifest = {
                "kind": "deltakern-scores",
                "version": MANIFEST_VERSION,
                "output": out_path.name,
                "args": args,
                "model": clip.describe(),
                "classes": {"count": len(names), "names": names},
                "rows": sum(r["rows"] for r in records),
                "images": sum(r["images"] for r in records),
                "parts": [{"index": r["index"], "file": f"{parts_dir.name}/{r['file']}", "rows": r["rows"]} for r in records],
                "errors": errors,
                "timing": sum_timings([r["timing"] for r in records]),
                "last_run": total,
            }
            write_json(manifest_path, manifest)
            return manifest

        return _finish(rt, stats, finalize)
    finally:
        rt.close()


def _feature_stream(shards: Sequence[FeatureShard], rt: Runtime, read: Callable, progress: bool) -> Iterator[ShardEmbeddings]:
    """Feature shards as :class:`ShardEmbeddings` (no decoding, no encoder)."""
    from tqdm.auto import tqdm

    for shard in tqdm(shards, unit="shard", disable=not progress or rt.rank != 0, dynamic_ncols=True):
        timer = SectionTimer(rt.device)
        t0 = time.perf_counter()
        X, ids, sources = read(shard.path)
        timer.add("data_wait_s", time.perf_counter() - t0)
        yield ShardEmbeddings(
            index=shard.index,
            ids=ids,
            sources=sources,
            embeddings=X.to(rt.device, non_blocking=True).float(),
            errors=[],
            images=len(ids),
            timer=timer,
        )
