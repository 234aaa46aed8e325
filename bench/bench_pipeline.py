"""Images/s of ``deltakern score`` (decode -> encode -> score -> parquet) on synthetic images,
with the time split between decode, encode and score.

Generates ``--images`` random JPEGs (``--size`` pixels square) and ``--classes`` class names in a
temporary directory, then runs :func:`deltakern.pipeline.run_score` with the tiny open_clip model
and random weights. ``decode_s`` is summed over the DataLoader workers (it overlaps the rest);
``data_wait_s`` is the time the main process waited for decoded batches.

    python bench/bench_pipeline.py [--images 1024] [--workers 2] [--batch-size 128] [--device cpu]

Writes OUT/pipeline_<device>.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

from deltakern import bench as bm
from deltakern.data.atomic import write_json


def make_images(root: Path, n: int, size: int, seed: int = 0) -> None:
    """``n`` random RGB JPEGs in two subfolders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        path = root / ("a" if i % 2 else "b") / f"img{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(path, quality=90)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1024, help="synthetic images to score")
    p.add_argument("--size", type=int, default=96, help="image side in pixels (resized by the model's preprocessing)")
    p.add_argument("--classes", type=int, default=100, help="class names")
    p.add_argument("--model", default="deltakern-tiny", help="open_clip architecture (random weights)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="DataLoader decode workers")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", default="out/bench", help="output directory")
    args = p.parse_args(argv)
    from deltakern.pipeline import ScoreSettings, run_score

    with tempfile.TemporaryDirectory(prefix="deltakern-bench-images-") as tmp:
        root = Path(tmp)
        make_images(root / "images", args.images, args.size)
        (root / "classes.txt").write_text("".join(f"class {i}\n" for i in range(args.classes)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random weights are the point here
            settings = ScoreSettings(
                out=str(root / "scores.parquet"), model=args.model, pretrained="none", images=str(root / "images"),
                classes=str(root / "classes.txt"), batch_size=args.batch_size, workers=args.workers,
                device=args.device, shard_size=max(args.images, 1),
            )
            stats = run_score(settings, progress=False)
    keys = ("images", "errors", "wall_s", "setup_s", "decode_s", "data_wait_s", "encode_s", "score_s", "write_s", "images_per_s")
    doc = {
        "benchmark": "deltakern score (images)", "model": args.model, "device": args.device,
        "device_name": bm.device_name(args.device), "image_size": args.size, "classes": args.classes,
        "batch_size": args.batch_size, "workers": args.workers, **{k: stats.get(k) for k in keys},
        "command": " ".join(["python", "bench/bench_pipeline.py"] + (argv if argv is not None else sys.argv[1:])),
        **bm.environment(),
    }
    path = write_json(f"{args.out}/pipeline_{args.device}.json", doc, indent=2, allow_nan=False, default=str)
    streaming = doc["wall_s"] - doc["setup_s"]
    print(f"{doc['images']} images in {streaming:.2f} s of streaming -> {doc['images_per_s']:.1f} images/s "
          f"({args.model}, {args.device}, batch {args.batch_size}, {args.workers} workers)")
    print(f"  decode {doc['decode_s']:.2f} s (worker time), waiting for data {doc['data_wait_s']:.2f} s, "
          f"encode {doc['encode_s']:.2f} s, score {doc['score_s']:.3f} s, write {doc['write_s']:.3f} s, "
          f"setup {doc['setup_s']:.2f} s -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
