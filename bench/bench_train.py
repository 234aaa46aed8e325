"""Prompt-tuning steps/s and peak memory for the tiny open_clip model, with and without
``--cache-image-features`` (uses ``deltakern.prompt.benchmark_steps``: a step encodes the batch
with the frozen image tower unless the features are cached, runs the text tower over the class
prompts, the EBM loss, backward and an SGD step).

    python bench/bench_train.py [--model deltakern-tiny] [--classes 10] [--batch-size 32] [--device cpu]

Writes OUT/train_<device>.json. Peak extra memory: on CPU the peak RSS of a child process above
its size after loading the model; on CUDA the allocator's peak.
"""

from __future__ import annotations

import argparse
import sys

import torch

from deltakern import bench as bm
from deltakern.data.atomic import write_json


def _steps(clip, args, cache: bool) -> dict:
    from deltakern.prompt import benchmark_steps

    return benchmark_steps(clip, args["classes"], batch_size=args["batch_size"], steps=args["steps"],
                           warmup_steps=2, cache_image_features=cache)


def train_call(model: str, device: str, args: dict, cache: bool):
    """The measured call (built in the memory child): the model is loaded before it runs."""
    from deltakern.clip.models import load_model

    clip = load_model(model, "none", device=device)
    return lambda: _steps(clip, args, cache)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deltakern-tiny", help="open_clip architecture (random weights)")
    p.add_argument("--classes", type=int, default=10, help="classes (prompts through the text tower per step)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", default="out/bench", help="output directory")
    args = p.parse_args(argv)
    import warnings

    from deltakern.clip.models import load_model

    settings = {"classes": args.classes, "batch_size": args.batch_size, "steps": args.steps}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights are the point here
        clip = load_model(args.model, "none", device=args.device)
    results = []
    child = bm.ChildMemory() if args.device == "cpu" else None
    try:
        for cache in (False, True):
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            stats = _steps(clip, settings, cache)
            if args.device == "cuda":
                peak, method = torch.cuda.max_memory_allocated() - base, "cuda_allocator"
            else:
                peak, method = child.measure(train_call, args.model, args.device, settings, cache, warmup=False)
            times = sorted(stats["step_times"])
            results.append({
                "cache_image_features": cache, "steps_per_s": stats["steps_per_second"],
                "median_step_ms": 1e3 * times[len(times) // 2], "steps": len(times),
                "peak_extra_mb": peak / 2**20, "memory_method": method,
            })
    finally:
        if child is not None:
            child.close()
    doc = {
        "benchmark": "prompt-tuning steps", "model": args.model, "device": args.device,
        "device_name": bm.device_name(args.device), "classes": args.classes, "batch_size": args.batch_size,
        "precision": stats["precision"], "results": results,
        "command": " ".join(["python", "bench/bench_train.py"] + (argv if argv is not None else sys.argv[1:])),
        **bm.environment(),
    }
    path = write_json(f"{args.out}/train_{args.device}.json", doc, indent=2, allow_nan=False, default=str)
    from tabulate import tabulate

    print(tabulate([[r["cache_image_features"], f"{r['steps_per_s']:.2f}", f"{r['median_step_ms']:.1f}",
                     f"{r['peak_extra_mb']:.1f}"] for r in results],
                   headers=["--cache-image-features", "steps/s", "median step ms", "peak extra MB"], tablefmt="github"))
    print(f"{args.model}, {args.classes} classes, batch {args.batch_size}, {args.device} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
