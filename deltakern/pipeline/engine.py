"""The engine under encode and score: shard streams, shard records, the torchrun barrier.

The pipeline (``deltakern.pipeline``) streams encode -> score -> write, resumable, crash-safe and
sharded across torchrun ranks:

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
For its whole life a run holds a lock on its run directory (:func:`exclusive`; rank 0 holds it,
the operating system drops it when the process dies), so a second run on the same output is
refused; under that lock, before writing anything, it removes the temporary files a killed run
left behind (:func:`check_and_clean`).

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

"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from deltakern.core.errors import InvalidArgument
from deltakern.data.rundir import RunDir
from deltakern.runtime import Runtime, SectionTimer, on_rank0, sum_timings


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


def model_input_side(clip: Any) -> int:
    """The longest side of the model's input (224 for ViT-B-32): the size a JPEG draft must keep."""
    size = getattr(clip.model.visual, "preprocess_cfg", {}).get("size") or clip.model.visual.image_size
    return int(max(size)) if isinstance(size, (tuple, list)) else int(size)


def embed_shards(
    clip: Any,
    shards: Sequence[Any],
    rt: Runtime,
    *,
    batch_size: int,
    workers: int,
    progress: bool,
    exif_transpose: bool = True,
    jpeg_draft: bool = False,
    gpu_decode: bool = False,
) -> Iterator[ShardEmbeddings]:
    """Decode (DataLoader workers) and encode the images of ``shards``, yielding shard by shard.

    One DataLoader spans all shards, so workers keep prefetching across shard boundaries; no
    batch spans two shards. Images that fail to decode are reported in ``errors``. With
    ``jpeg_draft`` large JPEGs are decoded at a reduced scale that keeps both sides at least
    the model's input side (:func:`deltakern.data.images.request_jpeg_draft`). The model's
    transform runs as :func:`deltakern.clip.preprocess.one_pass_transform` makes it (the same
    tensors, bit for bit). With
    ``gpu_decode`` the workers only read JPEG files and this process decodes them in batches on
    ``rt.device`` (:mod:`deltakern.data.gpu_jpeg`); other formats stay on the workers.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from deltakern.clip.preprocess import one_pass_transform
    from deltakern.data.images import DecodeDataset, collate_decoded, shard_batches

    if not shards:
        return
    items_per_shard = [s.list_items() for s in shards]
    flat = [item for items in items_per_shard for item in items]
    draft_size = model_input_side(clip) if jpeg_draft else None
    preprocess = one_pass_transform(clip.preprocess)  # the same tensors, a fraction of the worker's CPU
    finish_on_device: Callable[[Any], Any] | None = None
    if gpu_decode:
        from deltakern.data import gpu_jpeg

        dataset: DecodeDataset = gpu_jpeg.JpegPassthroughDataset(flat, preprocess, exif_transpose=exif_transpose,
                                                                 draft_size=draft_size)
        collate: Callable = gpu_jpeg.collate_passthrough
        tensor_preprocess = gpu_jpeg.TensorPreprocess.from_config(clip.model.visual.preprocess_cfg)

        def finish_on_device(batch: Any) -> Any:
            return gpu_jpeg.finish_batch(batch, rt.device, tensor_preprocess, preprocess, exif_transpose=exif_transpose)
    else:
        dataset, collate = DecodeDataset(flat, preprocess, exif_transpose=exif_transpose, draft_size=draft_size), collate_decoded
    loader = DataLoader(
        dataset,
        batch_sampler=shard_batches([len(items) for items in items_per_shard], batch_size),
        num_workers=workers,
        collate_fn=collate,
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
                if finish_on_device is not None:  # JPEGs decoded here, on the device; decode_s includes it
                    batch = finish_on_device(batch)
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


def process_shards(
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
        for shard in stream:
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


def pending_shards(shards: Sequence[Any], run: RunDir, rt: Runtime) -> tuple[list[Any], int]:
    """This rank's shards (``index % world_size == rank``) not yet done, and how many are done."""
    mine = [s for s in shards if s.index % rt.world_size == rt.rank]
    pending = [s for s in mine if not run.is_done(s.index)]
    return pending, len(mine) - len(pending)


def finish(rt: Runtime, stats: dict[str, Any], finalize: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """Gather every rank's stats (the barrier), let rank 0 write the final outputs.

    ``finalize(this run's totals)`` returns the totals of the whole output (``rows``,
    ``images``, ``errors``), which every rank gets back under the stats' ``output``."""
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
    message = output = None
    if rt.rank == 0:
        try:
            output = finalize(total)
        except Exception as exc:  # tell the other ranks instead of leaving them waiting
            rt.broadcast((f"{type(exc).__name__}: {exc}", None))
            raise
    message, output = rt.broadcast((message, output))
    if message is not None:
        raise RuntimeError(f"rank 0 failed to write the final output: {message}")
    total["output"] = output
    return total


def exclusive(run: RunDir, rt: Runtime, what: str) -> contextlib.AbstractContextManager:
    """Rank 0 holds the run directory's lock for the block (:meth:`RunDir.lock`); when it cannot,
    every rank raises the same clear error instead of writing beside the other run."""
    return on_rank0(rt, lambda: run.lock(what))


def check_and_clean(run: RunDir, rt: Runtime, args: dict[str, Any], what: str, clean: Callable[[], Any]) -> None:
    """Before the model loads: refuse a run directory started with other arguments, then (rank 0,
    under the lock) remove the temporary files a killed run left behind."""
    message = None
    if rt.rank == 0:
        message = run.check(args, what)
        if message is None:
            clean()
    message = rt.broadcast(message)
    if message is not None:
        raise InvalidArgument(message)


def claim(run: RunDir, rt: Runtime, args: dict[str, Any], what: str) -> None:
    """Record ``args`` in ``run.json`` (rank 0), or refuse when it records others."""
    message = run.claim(args, what) if rt.rank == 0 else None
    message = rt.broadcast(message)
    if message is not None:
        raise InvalidArgument(message)


def all_records(run: RunDir, shards: Sequence[Any]) -> list[dict[str, Any]]:
    missing = [s.index for s in shards if not run.is_done(s.index)]
    if missing:
        raise RuntimeError(f"shards {missing[:10]} of {run.path} are not finished; rerun to complete them")
    return [run.record(s.index) for s in shards]


def feature_stream(shards: Sequence[Any], rt: Runtime, read: Callable, progress: bool) -> Iterator[ShardEmbeddings]:
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
