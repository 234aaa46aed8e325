"""NegLabel beside ΔEnergy on CPU: one fused pass against two passes and against eager PyTorch.

``python bench/bench_neglabel.py [--n 200000 --k 1000 --m 10000 --d 512 --groups 1] [--rounds 3]``

Times, side by side in one run (calls interleaved round by round, medians over the rounds), the
full NegLabel + ΔEnergy state of N float32 embeddings against K ID classes and M negative labels:

- ``one pass (op)``: ``deltakern::fused_score_neg_state``: each chunk of rows is read, normed and
  converted once and meets both class matrices while it is in cache;
- ``two passes (op + op)``: ``fused_score_state`` over the ID classes, then
  ``fused_score_neg_state`` with a single ID class for the negative groups (X read twice);
- ``dk.score, one pass``: the public call with ``negatives=`` (what users run);
- ``dk.score + separate negative pass``: the ID scores fused and the negative groups by the
  row-chunked plain-PyTorch pass (deltakern before the fused NegLabel op);
- ``eager PyTorch``: what a user writes: normalise, one matmul against ``[W; W_neg]`` per block
  of rows (the full N×(K+M) float32 logits would take N·(K+M)·4 bytes: 8.8 GB at the default
  shape), ``logsumexp``/``topk``/``scatter`` for ΔEnergy and the NegLabel share.

Before timing, NegLabel and ΔEnergy of every variant are compared with float64 on the first rows
(worst error as a multiple of the contract's tolerance, docs/conventions.md §3). Prints the
machine and a table of medians and ratios; writes OUT/neglabel.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

import deltakern as dk
from deltakern.core.constants import score_tolerance
from deltakern.core.neglabel import neglabel_log_share
from deltakern.data import atomic
from deltakern.ops import registry
from deltakern.reference.negatives import negative_lse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_score import interleaved, machine  # noqa: E402

TEMPERATURE = 0.01
CHECK_ROWS = 2000
EAGER_BLOCK_ROWS = 20_000


def inputs(n: int, k: int, m: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(k, d, generator=g)
    N = torch.randn(m, d, generator=g)
    # A third of the rows near an ID class, a third near a negative label, a third random.
    X = torch.randn(n, d, generator=g)
    third = n // 3
    X[:third] += 4.0 * W[torch.randint(k, (third,), generator=g)]
    X[third : 2 * third] += 4.0 * N[torch.randint(m, (third,), generator=g)]
    return X, W, N


def from_state(top_v, outside, lse_neg) -> tuple[torch.Tensor, torch.Tensor]:
    """(neglabel, ΔEnergy at reset 0, c = 1) from a state, as dk.score derives them."""
    lse_id = torch.logaddexp(top_v[:, 0].double(), outside.double())
    delta = lse_id - torch.logaddexp(torch.zeros_like(lse_id), outside.double())
    return neglabel_log_share(lse_id, lse_neg), delta


def one_pass_op(X, W, N, groups):
    top_v, _, outside, lse_neg = registry.fused_score_neg_state(X, W, N, 1 / TEMPERATURE, 1, groups, True)
    return from_state(top_v, outside, lse_neg)


def two_pass_op(X, W, N, groups):
    top_v, _, outside = registry.fused_score_state(X, W, 1 / TEMPERATURE, 1, True)
    lse_neg = registry.fused_score_neg_state(X, W[:1], N, 1 / TEMPERATURE, 1, groups, True)[3]
    return from_state(top_v, outside, lse_neg)


def dk_one_pass(X, W, N, groups):
    s = dk.score(X, W, temperature=TEMPERATURE, negatives=N, negative_groups=groups, backend="cpp")
    return s.neglabel, s.delta_energy


def dk_two_pass(X, W, N, groups):
    s = dk.score(X, W, temperature=TEMPERATURE, backend="cpp")
    lse_neg = negative_lse(X, N, temperature=TEMPERATURE, groups=groups, normalize=True)
    return neglabel_log_share(s.energy, lse_neg), s.delta_energy


def eager(X, W, N, groups):
    """Plain PyTorch over blocks of rows: one matmul against [W; W_neg], then the reductions."""
    k, m = W.shape[0], N.shape[0]
    classes = torch.nn.functional.normalize(torch.cat([W, N]), dim=1)
    neglabel, delta = [], []
    for start in range(0, X.shape[0], EAGER_BLOCK_ROWS):
        x = torch.nn.functional.normalize(X[start : start + EAGER_BLOCK_ROWS], dim=1)
        logits = x @ classes.T / TEMPERATURE
        ids = logits[:, :k]
        lse_id = torch.logsumexp(ids, dim=1)
        top_i = ids.argmax(dim=1, keepdim=True)
        delta.append(lse_id - torch.logsumexp(ids.scatter(1, top_i, 0.0), dim=1))
        lse_neg = torch.logsumexp(logits[:, k:].reshape(-1, groups, m // groups), dim=2)
        neglabel.append(neglabel_log_share(lse_id, lse_neg))
    return torch.cat(neglabel), torch.cat(delta)


def worst_error(X, W, N, groups, scorer) -> float:
    """Worst |error| of NegLabel and ΔEnergy on the first rows as a multiple of the contract's
    bound max(tol·|e|, tol) against float64 on the same values."""
    x = X[:CHECK_ROWS]
    want = dk.score(x.double(), W.double(), temperature=TEMPERATURE, negatives=N.double(),
                    negative_groups=groups, backend="reference")
    got_neglabel, got_delta = scorer(x, W, N, groups)
    tol = score_tolerance("float32")
    worst = 0.0
    for a, e in ((got_neglabel, want.neglabel), (got_delta, want.delta_energy)):
        worst = max(worst, float(((a.double() - e).abs() / (e.abs() * tol).clamp(min=tol)).max()))
    return worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Ratios are to the one-pass op, measured in the same run.")
    p.add_argument("--n", type=int, default=200_000, help="image embeddings (default 200000)")
    p.add_argument("--k", type=int, default=1000, help="ID classes (default 1000)")
    p.add_argument("--m", type=int, default=10_000, help="negative labels (default 10000)")
    p.add_argument("--d", type=int, default=512, help="embedding width (default 512)")
    p.add_argument("--groups", type=int, default=1, help="negative groups (default 1; must divide M)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    p.add_argument("--no-eager", action="store_true", help="skip the eager PyTorch baseline")
    p.add_argument("--out", type=Path, default=Path("out/bench"), help="directory for neglabel.json")
    args = p.parse_args(argv)
    if not registry.has_kernel("fused_score_neg_state", "CPU"):
        p.error("the compiled extension with the fused_score_neg_state CPU kernel is required")
    X, W, N = inputs(args.n, args.k, args.m, args.d)
    scorers = {
        "one pass (op)": one_pass_op,
        "two passes (op + op)": two_pass_op,
        "dk.score, one pass": dk_one_pass,
        "dk.score + separate negative pass": dk_two_pass,
    }
    if not args.no_eager:
        scorers["eager PyTorch"] = eager
    errors = {name: worst_error(X, W, N, args.groups, fn) for name, fn in scorers.items()}
    times = interleaved({name: (lambda fn=fn: fn(X, W, N, args.groups)) for name, fn in scorers.items()}, args.rounds)
    medians = {name: statistics.median(t) / 1e3 for name, t in times.items()}
    base = medians["one pass (op)"]
    info = machine()
    print(f"{info['cpu']}, {info['threads']} threads, flags {' '.join(info['flags'])}, load {info['load_average']}")
    print(f"N={args.n} K={args.k} M={args.m} D={args.d} groups={args.groups}, float32, {args.rounds} interleaved rounds")
    print("| call | median s | ratio to one pass (op) | worst error / tolerance |")
    print("|---|---|---|---|")
    for name, sec in medians.items():
        print(f"| {name} | {sec:.2f} | {sec / base:.2f} | {errors[name]:.3f} |")
    report = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
              "median_s": medians, "times_ms": times, "worst_error_over_tolerance": errors}
    atomic.write_json(args.out / "neglabel.json", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
