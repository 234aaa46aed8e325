"""Zero-shot classifier build rate and prompt-tuning step rate with and without exact
text-sequence truncation.

    python bench/bench_zeroshot_build.py [--model ViT-B-32] [--classes 8] [--rounds 3] [--learner-classes 100]

Builds the class embeddings of the first ``--classes`` ImageNet classes with the 80 OpenAI
templates (random weights: ``pretrained=None``, no download), once with ``truncate=False`` (the
text transformer on the full 77-token context) and once with truncation (the first L tokens, L =
the batch's last end-of-text position + 1), interleaved round by round. Prints prompts/s for both,
their ratio, and the largest relative difference between the two classifiers. Then, with
``--learner-classes K`` (0 to skip), times one prompt-learner step (class embeddings of K classes
through the frozen text tower, forward and backward to the context) both ways. Writes
OUT/zeroshot_build.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from deltakern import bench as bm
from deltakern.clip import zeroshot
from deltakern.data import atomic


def learner_steps(model: torch.nn.Module, args) -> dict[str, float]:
    """Median seconds of one prompt-learner forward+backward, full context vs truncated."""
    from deltakern.prompt.learner import PromptLearner

    classes = zeroshot.imagenet_classnames()[: args.learner_classes]
    learners = {t: PromptLearner(model, classes, truncate=t) for t in (False, True)}
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.rounds):
        for truncate in ((False, True) if r % 2 == 0 else (True, False)):
            learner = learners[truncate]
            start = time.perf_counter()
            learner().float().pow(2).sum().backward()
            times[truncate].append(time.perf_counter() - start)
            learner.ctx.grad = None
    med = {"full": statistics.median(times[False]), "truncated": statistics.median(times[True])}
    print(f"prompt-learner step, K = {len(classes)}: full context {med['full']:.2f} s, truncated "
          f"{med['truncated']:.2f} s ({1 / med['full']:.2f} vs {1 / med['truncated']:.2f} steps/s, "
          f"{med['full'] / med['truncated']:.2f}x)")
    return med


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random weights)")
    p.add_argument("--classes", type=int, default=8, help="how many ImageNet classes (80 prompts each)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--learner-classes", type=int, default=100, help="classes of the prompt-learner step (0: skip)")
    p.add_argument("--out", default="out/bench", help="output directory")
    args = p.parse_args(argv)

    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(args.model, pretrained=None).eval()
    tokenizer = open_clip.get_tokenizer(args.model)
    classes = zeroshot.imagenet_classnames()[: args.classes]
    templates = zeroshot.template_preset("openai")
    prompts = len(classes) * len(templates)
    print(f"{args.model}, {len(classes)} classes x {len(templates)} templates = {prompts} prompts, "
          f"truncation available: {zeroshot.truncating_text_encoder(model) is not None}, "
          f"{bm.device_name('cpu')}")

    times: dict[bool, list[float]] = {False: [], True: []}
    result: dict[bool, torch.Tensor] = {}
    for r in range(args.rounds):
        for truncate in ((False, True) if r % 2 == 0 else (True, False)):
            start = time.perf_counter()
            result[truncate] = zeroshot.build_class_embeddings(model, tokenizer, classes, templates, truncate=truncate)
            times[truncate].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: prompts / v for k, v in med.items()}
    diff = float(((result[True] - result[False]).abs() / result[False].abs().max()).max())
    print(f"full context: {med[False]:.2f} s median ({rate[False]:.1f} prompts/s)")
    print(f"truncated:    {med[True]:.2f} s median ({rate[True]:.1f} prompts/s)")
    print(f"speedup {med[False] / med[True]:.2f}x; largest difference {diff:.2e} of the largest entry")
    steps = learner_steps(model, args) if args.learner_classes else {}
    meta = {"command": "python bench/bench_zeroshot_build.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "cpu": bm.device_name("cpu"), **bm.environment()}
    atomic.write_json(Path(args.out) / "zeroshot_build.json", {
        "meta": meta, "model": args.model, "prompts": prompts, "seconds": {"full": times[False], "truncated": times[True]},
        "prompts_per_s": {"full": rate[False], "truncated": rate[True]}, "max_rel_diff": diff,
        "learner_step_s": steps,
    }, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
