"""``deltakern.metrics.ood_metrics`` on 10 million ID + 10 million OOD float32 scores (target < 20 s).

The scores are drawn like real ΔEnergy outputs: two overlapping normal distributions, rounded
to 1/1024 so there are many ties (the exact tie handling is part of the cost). Before timing,
AUROC and AUPR-In on a 200,000-score subsample are compared with scikit-learn.

    python bench/bench_metrics.py [--n 10000000] [--repeats 3] [--out out/bench]

Writes OUT/metrics.json: median/min seconds, scores/s and the peak extra memory (measured in a
child process).
"""

from __future__ import annotations

import argparse
import sys

import torch

from deltakern import bench as bm
from deltakern.data.atomic import write_json


def make_scores(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` ID and ``n`` OOD float32 scores with many exact ties."""
    g = torch.Generator().manual_seed(seed)
    id_scores = torch.round((torch.randn(n, generator=g) + 1.5) * 1024) / 1024
    ood_scores = torch.round(torch.randn(n, generator=g) * 1024) / 1024
    return id_scores.float(), ood_scores.float()


def metrics_call(n: int):
    """The measured call (built in the memory child): the inputs exist before it runs."""
    from deltakern.metrics import ood_metrics

    id_scores, ood_scores = make_scores(n)
    return lambda: ood_metrics(id_scores, ood_scores)


def check_against_sklearn(id_scores: torch.Tensor, ood_scores: torch.Tensor, m: int = 200_000) -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    from deltakern.metrics import ood_metrics

    ids, oods = id_scores[:m].double().numpy(), ood_scores[:m].double().numpy()
    import numpy as np

    y = np.r_[np.ones(len(ids)), np.zeros(len(oods))]
    s = np.r_[ids, oods]
    ours = ood_metrics(id_scores[:m], ood_scores[:m])
    expected = {"auroc": roc_auc_score(y, s), "aupr_in": average_precision_score(y, s)}
    for key, value in expected.items():
        if abs(ours[key] - value) > 1e-9:
            raise bm.WrongAnswerError(f"{key} = {ours[key]!r} differs from scikit-learn's {value!r}; not timing it")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000_000, help="scores per set (ID and OOD each)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child")
    p.add_argument("--out", default="out/bench", help="output directory")
    args = p.parse_args(argv)
    from deltakern.metrics import ood_metrics

    id_scores, ood_scores = make_scores(args.n)
    check_against_sklearn(id_scores, ood_scores)
    timing = bm.time_cpu(lambda: ood_metrics(id_scores, ood_scores),
                         bm.TimingConfig(warmup=0, min_repeats=args.repeats, max_repeats=args.repeats, min_time_s=0))
    result = ood_metrics(id_scores, ood_scores)
    peak = method = None
    if not args.no_memory:
        del id_scores, ood_scores
        with bm.ChildMemory() as child:
            peak, method = child.measure(metrics_call, args.n, warmup=False)
    doc = {
        "benchmark": "ood_metrics", "n_id": args.n, "n_ood": args.n, "dtype": "float32",
        "device_name": bm.device_name("cpu"), "median_s": timing.median_ms / 1e3, "min_s": timing.min_ms / 1e3,
        "repeats": timing.repeats, "scores_per_s": 2 * args.n / (timing.median_ms / 1e3),
        "peak_extra_mb": None if peak is None else peak / 2**20, "memory_method": method,
        "result": result, "command": " ".join(["python", "bench/bench_metrics.py"] + (argv if argv is not None else sys.argv[1:])),
        **bm.environment(),
    }
    path = write_json(f"{args.out}/metrics.json", doc, indent=2, allow_nan=False, default=str)
    mem = "-" if peak is None else f"{peak / 2**20:.0f} MB"
    print(f"ood_metrics on {args.n:,} ID + {args.n:,} OOD float32 scores: median {doc['median_s']:.2f} s "
          f"(min {doc['min_s']:.2f} s, {timing.repeats} runs; target < 20 s), peak extra memory {mem}")
    print(f"auroc {result['auroc']:.6f}  fpr95 {result['fpr95']:.6f}  -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
