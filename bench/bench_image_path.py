"""The CPU image path of ``deltakern score``: how close end to end comes to the encoder alone,
and what JPEG DCT-domain downscaling (``--jpeg-draft``) buys on large photos.

Four parts (``--part``), each a few minutes on 2 cores:

``e2e``
    ``--images`` photos (``--photo-size``, default 500x375 like ImageNet's) scored by
    :func:`deltakern.pipeline.run_score` with ``--model`` (random weights), against the
    encoder's standalone rate on the same images already decoded and preprocessed (tensors in
    memory, same batch size, precision and torch threads), timed right before each run: the
    ratio reported is the median over ``--repeats`` of each run's rate over its neighbouring
    encoder rate (on a virtual machine the rate drifts by 10-20% within minutes). Configurations,
    interleaved: the new default decode workers / torch threads, the old default
    (``min(8, cores)`` workers, torch's own threads), ``--precision fp32`` beside ``auto``, and
    the workers running the model's own transform instead of the one-pass op
    (``model_transform_auto``); ``--only NAME ...`` keeps some of them.
    With ``--explore``: the new default beside other splits of the cores (1 worker and 1 thread,
    no workers, one worker per core with 1 thread). The process first keeps freed heap memory
    as the ``deltakern score`` command does (:func:`deltakern.runtime.heap.keep_freed_memory`),
    so runs and encoder both get it; ``--heap system`` leaves glibc's defaults (the A/B runs in
    two processes: the setting cannot be undone).
``encoder``
    The encoder alone on ``--images`` random-pixel tensors, ``auto`` precision and float32
    interleaved over ``--repeats``: images/s and, per pass, the process's minor page faults and
    user and kernel CPU seconds, and its peak RSS, so that ``--heap keep`` and ``--heap system``
    can be compared (one process each).
``preprocess``
    One DataLoader worker's CPU time per image (one thread) on ``--images`` photos of
    ``--photo-size``: decoding alone, decoding plus the model's transform (PIL resize, crop,
    ToTensor, Normalize), and decoding plus the one-pass transform
    (:func:`deltakern.clip.preprocess.one_pass_transform`), interleaved over ``--repeats``, with
    the count of images whose tensors differ between the two transforms (must be 0).
``photos``
    ``--photos`` large JPEGs (2000x1500 and portrait 1500x2000, some stored rotated with an
    EXIF orientation tag): decode + preprocess images/s with and without the JPEG draft
    (single process, interleaved), and how much the draft moves the embeddings (cosine between
    embeddings with and without it) beside how much bf16 autocast moves them (cosine between
    float32 and bf16-autocast embeddings of the same tensors).

The photos are cut from scikit-image's sample pictures (``pip install scikit-image``), upscaled
with Lanczos and given mild sensor-like noise (sigma 3 grey levels, so that the upscaled pictures
keep some of the fine detail of real photos), saved as quality-90 JPEGs.

    python bench/bench_image_path.py --part e2e [--images 512] [--model ViT-B-32] [--batch-size 64]
    python bench/bench_image_path.py --part photos [--photos 48]
    python bench/bench_image_path.py --part encoder [--heap system]
    python bench/bench_image_path.py --part preprocess [--images 512]

Writes OUT/image_path_<part>.json.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import torch

from deltakern import bench as bm
from deltakern.clip.preprocess import ONE_PASS_ENV
from deltakern.data.atomic import write_json
from deltakern.pipeline.parallelism import torch_threads
from deltakern.runtime.heap import keep_freed_memory

SAMPLES = ("astronaut", "coffee", "chelsea", "rocket", "retina", "hubble_deep_field", "immunohistochemistry")


def sample_pictures() -> list:
    """The colour sample photographs that ship inside scikit-image (no download)."""
    try:
        import skimage.data
    except ImportError:  # pragma: no cover - told to the user
        sys.exit("this benchmark needs scikit-image: pip install scikit-image (see requirements.txt)")
    return [getattr(skimage.data, name)() for name in SAMPLES]


def make_photos(root: Path, n: int, size: tuple[int, int], *, seed: int = 0, portrait_every: int = 0,
                rotated_every: int = 0) -> list[Path]:
    """``n`` JPEG photos of ``size`` (width, height) cut from the sample pictures (random crops,
    Lanczos resampling, noise sigma 3). Every ``portrait_every``-th is portrait (sides swapped);
    every ``rotated_every``-th is stored turned with EXIF orientation 6, as phones store them."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pictures = sample_pictures()
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        src = pictures[i % len(pictures)]
        h, w = src.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        out_w, out_h = size if not (portrait_every and i % portrait_every == portrait_every - 1) else size[::-1]
        img = Image.fromarray(src[y : y + ch, x : x + cw]).resize((out_w, out_h), Image.Resampling.LANCZOS)
        noisy = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 3.0, size=(out_h, out_w, 3)).astype(np.float32)
        img = Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))
        path = root / f"photo{i:05d}.jpg"
        if rotated_every and i % rotated_every == rotated_every - 1:
            exif = Image.Exif()
            exif[0x0112] = 6  # stored turned: the upright picture is the stored one rotated 90 degrees clockwise
            img.transpose(Image.Transpose.ROTATE_90).save(path, quality=90, exif=exif)
        else:
            img.save(path, quality=90)
        paths.append(path)
    return paths


def load(model: str):
    from deltakern.clip.models import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights are the point here
        return load_model(model, "none", device="cpu")


def encode_all(clip, tensors: torch.Tensor, batch_size: int, precision: str) -> torch.Tensor:
    from deltakern.runtime import autocast

    out = []
    with torch.inference_mode(), autocast(torch.device("cpu"), precision):
        for b in range(0, len(tensors), batch_size):
            out.append(clip.model.encode_image(tensors[b : b + batch_size]).float())
    return torch.nn.functional.normalize(torch.cat(out), dim=1)


def encode_pass(clip, tensors: torch.Tensor, batch_size: int, precision: str) -> dict[str, float]:
    """One timed :func:`encode_all` pass: images/s and the process's minor page faults and user and
    kernel CPU seconds over it."""
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    encode_all(clip, tensors, batch_size, precision)
    seconds, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return {
        "images_per_s": len(tensors) / seconds, "minor_faults": after.ru_minflt - before.ru_minflt,
        "user_s": after.ru_utime - before.ru_utime, "kernel_s": after.ru_stime - before.ru_stime,
    }


def part_photos(args: argparse.Namespace, root: Path) -> dict:
    from deltakern.data.images import DecodeDataset, ImageItem
    from deltakern.pipeline.engine import model_input_side

    paths = make_photos(root / "photos", args.photos, (2000, 1500), portrait_every=4, rotated_every=5)
    clip = load(args.model)
    side = model_input_side(clip)
    items = [ImageItem(id=p.name, source=str(p)) for p in paths]
    datasets = {"full": DecodeDataset(items, clip.preprocess), "draft": DecodeDataset(items, clip.preprocess, draft_size=side)}
    rates: dict[str, list[float]] = {k: [] for k in datasets}
    tensors: dict[str, torch.Tensor] = {}
    with torch_threads(1):  # one DataLoader worker's view: decoding is single-threaded there
        for _ in range(args.repeats):
            for name, ds in datasets.items():
                t0 = time.perf_counter()
                got = [ds[i][1] for i in range(len(ds))]
                rates[name].append(len(ds) / (time.perf_counter() - t0))
                tensors[name] = torch.stack(got)
    full32 = encode_all(clip, tensors["full"], args.batch_size, "fp32")
    draft32 = encode_all(clip, tensors["draft"], args.batch_size, "fp32")
    full16 = encode_all(clip, tensors["full"], args.batch_size, "bf16")
    cos_draft = (full32 * draft32).sum(1)
    cos_bf16 = (full32 * full16).sum(1)
    pixel = (tensors["full"] - tensors["draft"]).abs().mean(dim=(1, 2, 3))
    # For scale: how far apart the embeddings of different photos are (random weights put every
    # embedding close to a common direction, so all cosines are near 1).
    between = (full32 @ full32.T)[~torch.eye(len(full32), dtype=torch.bool)]
    stats = lambda t: {"mean": float(t.mean()), "min": float(t.min()), "median": float(t.median())}  # noqa: E731
    return {
        "photos": len(paths), "photo_size": "2000x1500 (every 4th 1500x2000; every 5th stored rotated, EXIF 6)",
        "model_input_side": side,
        "decode_images_per_s": {k: statistics.median(v) for k, v in rates.items()},
        "decode_images_per_s_all": rates,
        "decode_speedup": statistics.median(rates["draft"]) / statistics.median(rates["full"]),
        "cosine_draft_vs_full_fp32": stats(cos_draft),
        "cosine_bf16_vs_fp32_full": stats(cos_bf16),
        "one_minus_cosine_mean": {"draft": float(1 - cos_draft.mean()), "bf16": float(1 - cos_bf16.mean())},
        "preprocessed_mean_abs_diff_draft": stats(pixel),
        "cosine_between_different_photos_fp32": stats(between),
    }


def part_encoder(args: argparse.Namespace, root: Path) -> dict:  # noqa: ARG001 - no files
    from deltakern.pipeline.engine import model_input_side
    from deltakern.pipeline.parallelism import available_cores
    from deltakern.runtime import resolve_precision

    clip = load(args.model)
    side = model_input_side(clip)
    pixels = torch.randn(args.images, 3, side, side, generator=torch.Generator().manual_seed(0))
    precisions = sorted({resolve_precision(p, torch.device("cpu")) for p in ("auto", "fp32")})
    rows: dict[str, dict[str, list[float]]] = {p: {"images_per_s": [], "minor_faults": [], "user_s": [], "kernel_s": []}
                                               for p in precisions}
    with torch_threads(available_cores()):
        for p in precisions:
            encode_all(clip, pixels[: args.batch_size], args.batch_size, p)  # warm-up
        for _ in range(args.repeats):
            for p in precisions:
                for key, value in encode_pass(clip, pixels, args.batch_size, p).items():
                    rows[p][key].append(value)
    return {
        "images": args.images, "model": args.model, "batch_size": args.batch_size, "torch_threads": available_cores(),
        "encoder": {p: {**{f"median_{k}": statistics.median(v) for k, v in r.items()}, "all": r} for p, r in rows.items()},
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def part_preprocess(args: argparse.Namespace, root: Path) -> dict:
    from deltakern.clip.preprocess import OnePassTransform, one_pass_transform
    from deltakern.data.images import decode_image

    w, h = (int(v) for v in args.photo_size.split("x"))
    paths = make_photos(root / "images", args.images, (w, h), portrait_every=4)
    blobs = [p.read_bytes() for p in paths]
    clip = load(args.model)
    one_pass = one_pass_transform(clip.preprocess)
    if not isinstance(one_pass, OnePassTransform):
        raise SystemExit(f"the one-pass transform does not apply here: {one_pass!r}")
    steps = {
        "decode": lambda blob: decode_image(blob),
        "decode+model_transform": lambda blob: clip.preprocess(decode_image(blob)),
        "decode+one_pass": lambda blob: one_pass(decode_image(blob)),
    }
    ms: dict[str, list[float]] = {k: [] for k in steps}
    with torch_threads(1):  # one DataLoader worker's view
        for _ in range(args.repeats):
            for name, step in steps.items():
                t0 = time.perf_counter()
                for blob in blobs:
                    step(blob)
                ms[name].append((time.perf_counter() - t0) / len(blobs) * 1e3)
        differ = sum(not torch.equal(one_pass(img), clip.preprocess(img)) for img in map(decode_image, blobs))
    med = {k: statistics.median(v) for k, v in ms.items()}
    return {
        "images": len(paths), "photo_size": f"{args.photo_size} (every 4th portrait)", "model": args.model,
        "pass_order": one_pass.pass_order, "ms_per_image": med, "ms_per_image_all": ms,
        "transform_ms_per_image": {"model": med["decode+model_transform"] - med["decode"],
                                   "one_pass": med["decode+one_pass"] - med["decode"]},
        "worker_speedup": med["decode+model_transform"] / med["decode+one_pass"],
        "images_with_different_tensors": differ,
    }


def part_e2e(args: argparse.Namespace, root: Path) -> dict:
    from deltakern.data.images import DecodeDataset, ImageItem
    from deltakern.pipeline import ScoreSettings, run_score
    from deltakern.pipeline.parallelism import available_cores, choose_parallelism
    from deltakern.runtime import resolve_precision

    w, h = (int(v) for v in args.photo_size.split("x"))
    paths = make_photos(root / "images", args.images, (w, h), portrait_every=4)
    (root / "classes.txt").write_text("".join(f"class {i}\n" for i in range(args.classes)))
    cores = available_cores()
    new = choose_parallelism(cores, "cpu")
    old_workers = min(8, cores)  # the default before workers and threads were chosen together
    clip = load(args.model)
    items = [ImageItem(id=p.name, source=str(p)) for p in paths]
    ds = DecodeDataset(items, clip.preprocess)
    pre = torch.stack([ds[i][1] for i in range(len(ds))])  # decoded once, outside every timing
    configs: dict[str, dict] = {
        "new_default_auto": {"workers": None, "precision": "auto"},
        "old_default_auto": {"workers": old_workers, "precision": "auto"},
        "new_default_fp32": {"workers": None, "precision": "fp32"},
        # the decode workers running the model's own transform instead of the one-pass op
        "model_transform_auto": {"workers": None, "precision": "auto", "model_transform": True},
    }
    if args.explore:  # other splits of the cores, to check the rule's choice
        configs = {
            "new_default_auto": configs["new_default_auto"],
            "workers1_threads1": {"workers": 1, "precision": "auto", "threads": 1},
            "workers0_threadsN": {"workers": 0, "precision": "auto", "threads": cores},
            f"workers{cores}_threads1": {"workers": cores, "precision": "auto", "threads": 1},
        }
    if args.only:
        unknown = sorted(set(args.only) - set(configs))
        if unknown:
            raise SystemExit(f"--only: unknown configuration(s) {unknown}; choose from {sorted(configs)}")
        configs = {k: v for k, v in configs.items() if k in args.only}
    resolved = {p: resolve_precision(p, torch.device("cpu")) for p in ("auto", "fp32")}
    e2e: dict[str, list[float]] = {k: [] for k in configs}
    alone: dict[str, list[float]] = {p: [] for p in sorted({resolved[c["precision"]] for c in configs.values()})}
    runs: dict[str, dict] = {}
    paired: dict[str, list[float]] = {k: [] for k in configs}

    def encoder_alone(precision: str) -> float:
        with torch_threads(new.torch_threads):
            encode_all(clip, pre[: args.batch_size], args.batch_size, precision)  # warm-up
            return encode_pass(clip, pre, args.batch_size, precision)["images_per_s"]

    for rep in range(args.repeats):
        for name, cfg in configs.items():
            # The encoder alone right before each run: on a shared or virtual machine the rate
            # drifts by 10-20% over minutes, so each run is divided by its neighbour's rate.
            reference = encoder_alone(resolved[cfg["precision"]])
            alone[resolved[cfg["precision"]]].append(reference)
            cfg = dict(cfg)
            threads = cfg.pop("threads", None)  # with an explicit workers count the run leaves threads alone
            one_pass = "0" if cfg.pop("model_transform", False) else "1"
            with warnings.catch_warnings(), torch_threads(threads), mock.patch.dict(os.environ, {ONE_PASS_ENV: one_pass}):
                warnings.simplefilter("ignore")
                settings = ScoreSettings(
                    out=str(root / f"{name}-{rep}" / "scores.parquet"), model=args.model, pretrained="none",
                    images=str(root / "images"), classes=str(root / "classes.txt"), templates="single",
                    batch_size=args.batch_size, device="cpu", shard_size=max(args.images, 1), **cfg,
                )
                stats = run_score(settings, progress=False)
            e2e[name].append(stats["images_per_s"])
            paired[name].append(stats["images_per_s"] / reference)
            runs[name] = {k: stats.get(k) for k in ("images", "decode_s", "data_wait_s", "encode_s", "score_s")}
            runs[name]["parallelism"] = stats.get("parallelism")
    med = {k: statistics.median(v) for k, v in e2e.items()}
    alone_med = {k: statistics.median(v) for k, v in alone.items()}
    ratio = {k: statistics.median(v) for k, v in paired.items()}
    return {
        "images": args.images, "photo_size": args.photo_size, "cores": cores, "model": args.model,
        "batch_size": args.batch_size, "resolved_precision": resolved,
        "new_default": {"workers": new.workers, "torch_threads": new.torch_threads},
        "old_default": {"workers": old_workers, "torch_threads": torch.get_num_threads()},
        "e2e_images_per_s": med, "e2e_images_per_s_all": e2e,
        "encoder_alone_images_per_s": alone_med, "encoder_alone_all": alone,
        "e2e_over_encoder": ratio, "e2e_over_encoder_all": paired,
        "e2e_over_encoder_of_medians": {k: med[k] / alone_med[resolved[configs[k]["precision"]]] for k in configs},
        "last_runs": runs,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # the whole bench process's peak
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("e2e", "photos", "encoder", "preprocess"), required=True,
                   help="which measurement (see above)")
    p.add_argument("--model", default="ViT-B-32", help="open_clip architecture, random weights (default ViT-B-32)")
    p.add_argument("--batch-size", type=int, default=64, help="encoder batch size (default 64)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats; medians are reported (default 2)")
    p.add_argument("--images", type=int, default=512, help="e2e, encoder: images to score or encode (default 512)")
    p.add_argument("--photo-size", default="500x375", help="e2e: WIDTHxHEIGHT of the photos (default 500x375)")
    p.add_argument("--classes", type=int, default=100, help="e2e: class names (default 100)")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="e2e: run only these configurations (e.g. new_default_auto)")
    p.add_argument("--explore", action="store_true",
                   help="e2e: instead of old vs new default, the new default beside other worker/thread splits")
    p.add_argument("--heap", choices=("keep", "system"), default="keep",
                   help="e2e, encoder: keep freed heap memory as `deltakern score` does (default), or glibc's defaults")
    p.add_argument("--photos", type=int, default=48, help="photos: large JPEGs to decode (default 48)")
    p.add_argument("--out", default="out/bench", help="output directory")
    args = p.parse_args(argv)
    # Before anything is allocated, as the command does at start-up (the photos part decodes only).
    heap_kept = args.part != "photos" and args.heap == "keep" and keep_freed_memory()
    part = {"e2e": part_e2e, "photos": part_photos, "encoder": part_encoder, "preprocess": part_preprocess}[args.part]
    with tempfile.TemporaryDirectory(prefix="deltakern-bench-image-path-") as tmp:
        result = part(args, Path(tmp))
    doc = {
        "benchmark": f"image path ({args.part})", "device": "cpu", "device_name": bm.device_name("cpu"),
        **({} if args.part == "photos" else {"heap": args.heap, "heap_kept": heap_kept}),
        **result,
        "command": " ".join(["python", "bench/bench_image_path.py"] + (argv if argv is not None else sys.argv[1:])),
        **bm.environment(),
    }
    path = write_json(f"{args.out}/image_path_{args.part}.json", doc, indent=2, allow_nan=False, default=str)
    keys = ("decode_images_per_s", "decode_speedup", "one_minus_cosine_mean", "cosine_draft_vs_full_fp32",
            "cosine_bf16_vs_fp32_full", "e2e_images_per_s", "encoder_alone_images_per_s", "e2e_over_encoder",
            "new_default", "old_default", "resolved_precision", "heap_kept", "encoder", "max_rss_mb", "ms_per_image",
            "transform_ms_per_image", "worker_speedup", "images_with_different_tensors")
    for k in keys:
        if k in doc:
            print(f"{k}: {doc[k]}")
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
