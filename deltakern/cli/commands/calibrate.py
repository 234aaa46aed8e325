"""``deltakern calibrate``: fit a threshold on in-distribution scores and write it as JSON."""

from __future__ import annotations

import argparse

EXAMPLE = """\
examples:
  deltakern calibrate id_val.parquet --out T.json
  deltakern calibrate id_val.parquet --ood ood_val.parquet --score delta_energy --target-tpr 0.95 --out T.json

SCORES are parquet files of `deltakern score` on in-distribution images (or their folders of
parts); the manifest beside each (x.manifest.json) says how they were made, and they must all
have been made with the same settings. The threshold is the m-th largest ID score, m the
smallest count with m/n >= the target: a score >= the threshold is accepted, so ID scores
equal to it are all kept and at least the target share of ID rows passes. With --ood (scored
with the same settings) the FPR at that threshold (the share of OOD rows accepted) and the
AUROC are reported (dk.metrics, ID positive).
"""


def register(sub: argparse._SubParsersAction) -> None:
    from deltakern.ood.threshold import SCORE_NAMES

    p = sub.add_parser(
        "calibrate",
        help="fit a threshold keeping a target share of in-distribution scores; write it as JSON",
        description="Fit a decision threshold on the scores of in-distribution images (parquet files of "
        "`deltakern score`) so that a target share of them is accepted, and write it as JSON together "
        "with the settings the scores were made with (score, c, temperature, reset, mode, model, class "
        "set); `deltakern filter` refuses scores made otherwise.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("scores", nargs="+", metavar="SCORES", help="scored parquet files (or folders of parts) of ID images")
    p.add_argument("--ood", nargs="+", default=[], metavar="OOD_SCORES",
                   help="scored parquet files of OOD images: report the FPR at the threshold")
    p.add_argument("--score", choices=SCORE_NAMES, default="delta_energy", help="score column (default delta_energy)")
    p.add_argument("--target-tpr", type=float, default=0.95,
                   help="share of ID rows to accept, in (0, 1] (default 0.95: keep 95%% of ID images)")
    p.add_argument("--out", required=True, metavar="T.json", help="threshold file to write")
    p.set_defaults(func=run)


def _read_all(paths: list[str], score: str, param: str, identity=None):
    """All scores of ``paths`` (one identity for all of them) and that identity."""
    import numpy as np

    from deltakern.cli.commands.filter import identity_of, open_scored, read_scores
    from deltakern.core.errors import InvalidArgument

    chunks = []
    for path in paths:
        scored = open_scored(path, param=param)
        ident = identity_of(scored, score, param=param)
        if identity is None:
            identity = ident
        diff = identity.differences(ident)
        if diff:
            raise InvalidArgument(
                f"{path} was scored with other settings than the first ID scores: {'; '.join(diff)}", param=param
            )
        chunks.append(read_scores(scored, score))
    return np.concatenate(chunks), identity


def run(args: argparse.Namespace) -> int:
    from deltakern import metrics
    from deltakern.core.errors import InvalidArgument
    from deltakern.ood.threshold import check_target, fit_threshold

    try:
        check_target(args.target_tpr)
    except InvalidArgument as exc:
        raise InvalidArgument(str(exc), param="target_tpr") from exc
    id_scores, identity = _read_all(args.scores, args.score, "scores")
    ood_scores = _read_all(args.ood, args.score, "ood", identity)[0] if args.ood else None
    threshold = fit_threshold(id_scores, identity, target=args.target_tpr, ood_scores=ood_scores)
    line = (
        f"threshold: {args.score} >= {threshold.value!r} accepts {threshold.id_acceptance:.2%} of "
        f"{threshold.n_id} ID rows (target {threshold.target:.2%})"
    )
    if ood_scores is not None:
        m = metrics.ood_metrics(id_scores, ood_scores, tpr=threshold.target)
        # The same operating point seen from dk.metrics: its threshold must be ours.
        if m["threshold"] != threshold.value or m["fpr95"] != threshold.fpr:
            raise RuntimeError(f"threshold {threshold.value!r} / FPR {threshold.fpr} disagree with dk.metrics {m}")
        line += f"; OOD: FPR {m['fpr95']:.2%} of {m['n_ood']} rows accepted, AUROC {m['auroc']:.2%}"
    threshold.save(args.out)
    print(f"{line}; written to {args.out}")
    return 0
