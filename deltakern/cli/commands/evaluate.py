"""``deltakern eval``: score ID and OOD embedding sets, compare every score, write a report."""

from __future__ import annotations

import argparse
from pathlib import Path

from deltakern.cli.options import DEVICE_HELP, MATMUL_PRECISION_HELP, add_model_options, add_text_prompt_options
from deltakern.core.constants import BACKENDS, MATMUL_PRECISIONS
from deltakern.core.errors import InvalidArgument

EXAMPLE = """\
examples:
  deltakern eval --id imagenet_val.npy --classes imagenet_text.pt \\
      --ood inat=inat.npy --ood textures=dtd.safetensors --id-labels imagenet_val_labels.npy \\
      --c 5 --out runs/eval
  deltakern eval --synthetic --n 20000 --k 100 --out runs/synthetic
  deltakern eval --id val.npy --classes text.npy --ood inat=inat.npy \\
      --negative-labels words.txt --n-negative 10000 --negative-groups 2 \\
      --model ViT-B-32 --pretrained openai --class-names classes.txt --templates openai

Files hold [N, D] (embeddings) or [N] (labels) arrays: .npy, .npz, .pt/.pth or .safetensors; a
file with several arrays takes a key after a colon: feats.safetensors:image.
Scores are all "higher = in-distribution"; metrics use the full ROC curve (exact ties, one point
per distinct score). FPR95 with --positive id (default, CLIP/MCM papers): fraction of OOD
accepted when 95%% of ID is kept; --positive ood (OpenOOD v1.5): fraction of ID rejected when
95%% of OOD is caught. AUPR-In / AUPR-Out are average precision with ID / OOD positive.
"""


def _ood_spec(text: str) -> tuple[str, str]:
    """``NAME=PATH`` (or a bare PATH, named after its file stem)."""
    name, sep, path = text.partition("=")
    if not sep:
        return Path(text.split(":")[0]).stem, text
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate ID vs OOD embedding sets: AUROC, FPR95, AUPR-In/Out of every score",
        description="Score ID and OOD image embeddings against class embeddings in one fused pass\n"
        "per set, then compare ΔEnergy (separate and joint, and its effect for c = 1..C), energy,\n"
        "MSP, MCM and max-logit on every OOD set: a terminal table, and with --out a report\n"
        "(metrics.json, metrics.csv, report.md, PNG histograms and ROC curves).",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("inputs (files)")
    src.add_argument("--id", metavar="PATH", help="ID image embeddings [N, D]")
    src.add_argument("--ood", metavar="NAME=PATH", action="append", type=_ood_spec, default=[],
                     help="an OOD set's image embeddings [M, D]; repeat for several sets")
    src.add_argument("--classes", metavar="PATH", help="class (text) embeddings W [K, D]")
    src.add_argument("--id-labels", metavar="PATH", help="ID class labels [N] (int): adds ID top-1 accuracy")
    syn = p.add_argument_group(
        "synthetic source (instead of files; the same generator as `deltakern demo`, seeded by --seed)"
    )
    syn.add_argument("--synthetic", action="store_true", help="evaluate a synthetic CLIP-like set")
    syn.add_argument("--n", type=int, default=100_000, help="synthetic rows, ID + OOD (default 100,000)")
    syn.add_argument("--k", type=int, default=1000, help="synthetic classes (default 1000)")
    syn.add_argument("--d", type=int, default=512, help="synthetic embedding dimension (default 512)")
    syn.add_argument("--ood-fraction", type=float, default=0.5, help="synthetic share of OOD rows (default 0.5)")
    sc = p.add_argument_group("scoring")
    sc.add_argument("--temperature", type=float, default=0.01, help="τ: logits = cosine / τ (default 0.01)")
    sc.add_argument("--c", type=int, default=3,
                    help="reset the top-C logits for ΔEnergy; c = 1..C are all reported from the same pass (default 3)")
    sc.add_argument("--reset", type=float, default=0.0, help="reset value in cosine units (default 0)")
    sc.add_argument("--mcm-temperature", type=float, default=1.0, help="MCM's own softmax temperature (default 1.0)")
    sc.add_argument("--backend", default="auto", choices=BACKENDS,
                    help="scoring backend (default auto: Triton on CUDA, C++ on CPU)")
    sc.add_argument("--matmul-precision", default="highest", choices=MATMUL_PRECISIONS, help=MATMUL_PRECISION_HELP)
    sc.add_argument("--device", default="auto", help=DEVICE_HELP)
    sc.add_argument("--knn-bank", metavar="PATH",
                    help="ID training embeddings [M, D]: adds the kNN baseline score (Sun et al. 2022; faiss when installed)")
    sc.add_argument("--knn-k", type=int, default=50, help="the k of the kNN score (default 50)")
    sc.add_argument("--chunk-rows", type=int, default=65_536, help="rows scored per call (default 65536)")
    neg = p.add_argument_group(
        "NegLabel (adds a row computed in the same calls as ΔEnergy; docs/conventions.md §2.5)"
    )
    negative_source = neg.add_mutually_exclusive_group()
    negative_source.add_argument("--negatives", metavar="PATH",
                                 help="precomputed negative-label embeddings [M, D], e.g. from "
                                 "deltakern.clip.negatives.mine_negative_labels")
    negative_source.add_argument("--negative-labels", metavar="VOCAB",
                                 help="text file with one candidate word or phrase per line: mines the --n-negative "
                                 "farthest from the ID classes (cached); needs --model, --pretrained, --class-names")
    neg.add_argument("--n-negative", type=int, default=10_000,
                     help="negative labels to mine from --negative-labels (default 10000)")
    neg.add_argument("--negative-groups", type=int, default=1,
                     help="groups the negatives are split into, NegLabel's grouping (default 1)")
    enc = p.add_argument_group("text encoder of --negative-labels (the one that embedded --classes)")
    add_model_options(enc, required=False)
    # One --seed serves the synthetic generator and the random weights of --pretrained none: the
    # two never meet, since --synthetic refuses --negative-labels.
    next(a for a in enc._group_actions if a.dest == "seed").help = (
        "seed of --synthetic's generator and of the random weights of --pretrained none (default 0)"
    )
    enc.add_argument("--class-names", metavar="FILE",
                     help="ID class names, one per line in the row order of --classes (required with --negative-labels)")
    add_text_prompt_options(enc)
    me = p.add_argument_group("metrics and output")
    me.add_argument("--tpr", type=float, default=0.95, help="TPR of the FPR column (default 0.95)")
    me.add_argument("--positive", default="id", choices=["id", "ood"],
                    help="FPR95 convention of the table: id (CLIP/MCM) or ood (OpenOOD v1.5); JSON has both")
    me.add_argument("--out", metavar="DIR", help="write metrics.json, metrics.csv, report.md and PNGs here")
    me.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    me.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _tensor_sha256(t) -> str:
    """SHA-256 of a tensor's raw bytes (C order), for inputs that are generated, not read."""
    import hashlib

    import torch

    raw = t.detach().cpu().contiguous().view(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy()).hexdigest()


def _info(t, **extra) -> dict:
    return {**extra, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}


def _load_files(args) -> tuple:
    """(W, {set: X}, id_labels or None, inputs metadata) from --id/--ood/--classes."""
    from deltakern.data.arrays import file_sha256, load_embeddings, load_labels, split_key

    missing = [flag for flag, value in (("--id", args.id), ("--ood", args.ood), ("--classes", args.classes)) if not value]
    if missing:
        raise InvalidArgument(f"{', '.join(missing)} required (or use --synthetic), got none")
    names = [name for name, _ in args.ood]
    if len(set(names)) != len(names) or "ID" in names:
        raise InvalidArgument(f"--ood set names must be unique and not 'ID', got {names}")
    W = load_embeddings(args.classes, name="--classes")
    sets = {"ID": load_embeddings(args.id, name="--id", dim=W.shape[1])}
    for name, path in args.ood:
        sets[name] = load_embeddings(path, name=f"--ood {name}", dim=W.shape[1])
    labels = None
    if args.id_labels:
        labels = load_labels(args.id_labels, name="--id-labels", n=sets["ID"].shape[0])
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= W.shape[0]:
            raise InvalidArgument(f"--id-labels must lie in [0, K) = [0, {W.shape[0]}), got a label {low if low < 0 else high}")
    inputs = {}
    for key, spec, t in [("classes", args.classes, W), ("ID", args.id, sets["ID"])] + [
        (f"OOD {name}", path, sets[name]) for name, path in args.ood
    ] + ([("id_labels", args.id_labels, labels)] if labels is not None else []):
        path, array_key = split_key(spec)
        inputs[key] = _info(t, path=str(path), key=array_key, sha256=file_sha256(path))
    return W, sets, labels, inputs


def _load_synthetic(args) -> tuple:
    from deltakern.ood.synthetic import make_synthetic

    if args.id or args.ood or args.classes or args.id_labels:
        raise InvalidArgument("--synthetic replaces --id, --ood, --classes and --id-labels; got both")
    data = make_synthetic(args.n, args.k, args.d, args.seed, args.ood_fraction)
    is_ood = data.is_ood
    if bool(is_ood.all()) or not bool(is_ood.any()):
        raise InvalidArgument(f"--ood-fraction must leave both ID and OOD rows, got {args.ood_fraction} with --n {args.n}")
    sets = {"ID": data.X[~is_ood], "synthetic": data.X[is_ood]}
    labels = data.labels[~is_ood]
    source = (f"deltakern.ood.synthetic.make_synthetic(n={args.n}, k={args.k}, d={args.d}, seed={args.seed}, "
              f"ood_fraction={args.ood_fraction})")
    inputs = {
        "classes": _info(data.W, source=source, sha256=_tensor_sha256(data.W)),
        "ID": _info(sets["ID"], source=source, sha256=_tensor_sha256(sets["ID"])),
        "OOD synthetic": _info(sets["synthetic"], source=source, sha256=_tensor_sha256(sets["synthetic"])),
        "id_labels": _info(labels, source=source, sha256=_tensor_sha256(labels)),
    }
    return data.W, sets, labels, inputs


def _plan_negative_labels(args):
    """What ``--negative-labels`` will mine, read and checked before any embeddings or weights
    load (None without the flag): a :class:`deltakern.pipeline.classes.NegativePlan`."""
    from deltakern.clip import zeroshot
    from deltakern.core.validation import check_classnames, check_int_range
    from deltakern.data.text import read_lines
    from deltakern.pipeline.classes import ClassPlan, plan_negatives

    encoder_flags = [flag for flag, given in (
        ("--model", args.model), ("--pretrained", args.pretrained), ("--class-names", args.class_names),
        ("--templates", args.templates != "openai"), ("--cache-dir", args.cache_dir),
    ) if given]  # fmt: skip
    if not args.negative_labels:
        if encoder_flags:
            raise InvalidArgument(f"{', '.join(encoder_flags)} only serve --negative-labels, which is not given")
        return None
    if args.synthetic:
        raise InvalidArgument("--negative-labels needs ID class names and their text encoder; --synthetic has neither")
    missing = [flag for flag, value in (
        ("--model", args.model), ("--pretrained", args.pretrained), ("--class-names", args.class_names),
    ) if not value]  # fmt: skip
    if missing:
        raise InvalidArgument(f"--negative-labels needs {', '.join(missing)} (the text encoder and ID class names to mine with)")
    check_int_range("n_negative", args.n_negative, 1, 1 << 30)
    check_int_range("negative_groups", args.negative_groups, 1, args.n_negative)
    names = check_classnames(read_lines(args.class_names, name="class_names"), "class_names")
    preset = args.templates in zeroshot.TEMPLATE_PRESETS
    templates = list(zeroshot.template_preset(args.templates) if preset else read_lines(args.templates, name="templates"))
    plan = ClassPlan(names=names, templates=templates, prompts=None, identity={})
    return plan_negatives(args, plan)


def _mine(args, plan, W, device) -> tuple:
    """(mined negative embeddings [M, D] on ``device``, what metrics.json records of them)."""
    from deltakern.cli.options import plain_warnings
    from deltakern.clip.models import check_model, load_model, weights_identity
    from deltakern.clip.negatives import DEFAULT_PERCENTILE
    from deltakern.data.arrays import file_sha256
    from deltakern.runtime import autocast_dtype, resolve_precision

    if len(plan.id_names) != W.shape[0]:
        raise InvalidArgument(
            f"--class-names lists {len(plan.id_names)} classes but --classes has K = {W.shape[0]} rows; "
            "give one name per row, in the same order"
        )
    check_model(args.model, args.pretrained)
    plain_warnings("eval")
    precision = resolve_precision("auto", device)  # what `deltakern score` uses by default

    def check_width(embed_dim: int) -> None:
        if embed_dim != W.shape[1]:
            raise InvalidArgument(
                f"--model {args.model} --pretrained {args.pretrained} embeds text in D = {embed_dim} dimensions but "
                f"--classes and the image embeddings have D = {W.shape[1]}; give the encoder that made them"
            )

    # Mined before with this encoder: read back without loading the model.
    mined = plan.cached(args.model, args.pretrained, cache_dir=args.cache_dir, seed=args.seed,
                        autocast_dtype=autocast_dtype(precision), device=device)
    if mined is not None:
        check_width(mined.embeddings.shape[1])
    else:
        clip = load_model(args.model, args.pretrained, device=device, seed=args.seed)
        check_width(clip.embed_dim)  # before mining, which may embed a large vocabulary
        mined = plan.mine(clip, cache_dir=args.cache_dir, seed=args.seed, autocast_dtype=autocast_dtype(precision))
    record = {
        "vocabulary": str(args.negative_labels),
        "vocabulary_sha256": file_sha256(args.negative_labels),
        "usable_vocabulary": len(plan.vocabulary),
        "n_negative": args.n_negative,
        "negative_groups": args.negative_groups,
        "model": args.model,
        "pretrained": args.pretrained,
        "weights": weights_identity(args.pretrained),
        "seed": args.seed,
        "templates": args.templates,
        "class_names": str(args.class_names),
        "percentile": DEFAULT_PERCENTILE,
        "precision": precision,
        **plan.identity,
        "names": mined.names,
    }
    return mined.embeddings.float().to(device), record


def run(args: argparse.Namespace) -> int:
    import torch

    from deltakern._version import __version__
    from deltakern.ood.evaluation import SCORE_LABELS, evaluate_sets, score_columns
    from deltakern.ood.report import write_report
    from deltakern.runtime import resolve_device
    from deltakern.scoring import resolve_backend

    negative_plan = _plan_negative_labels(args)
    W, sets, labels, inputs = _load_synthetic(args) if args.synthetic else _load_files(args)
    device = resolve_device(args.device)
    W = W.to(device)
    backend = resolve_backend(args.backend, device, args.c)
    print(
        f"deltakern eval: K={W.shape[0]}, D={W.shape[1]}, c=1..{args.c}, τ={args.temperature}, "
        f"reset={args.reset}, MCM T={args.mcm_temperature}, device={device}, backend={backend}"
    )
    columns = {}
    extra_scores = []
    negatives = None
    if args.negatives:
        from deltakern.data.arrays import file_sha256, load_embeddings, split_key

        negatives = load_embeddings(args.negatives, name="--negatives", dim=W.shape[1]).to(device)
        path = split_key(args.negatives)[0]
        inputs["negatives"] = _info(negatives, path=str(path), sha256=file_sha256(path))
        extra_scores.append("neglabel")
    negative_labels = None
    if negative_plan is not None:
        negatives, negative_labels = _mine(args, negative_plan, W, device)
        inputs["negatives"] = _info(negatives, source="mined from --negative-labels", sha256=_tensor_sha256(negatives))
        print(f"NegLabel: {negatives.shape[0]} negative labels mined from {args.negative_labels} "
              f"({len(negative_plan.vocabulary)} usable entries), {args.negative_groups} group(s)")
        extra_scores.append("neglabel")
    for name, X in sets.items():
        columns[name] = score_columns(
            X, W, temperature=args.temperature, c=args.c, reset=args.reset, backend=backend,
            mcm_temperature=args.mcm_temperature, chunk_rows=args.chunk_rows,
            desc=f"scoring {name} ({X.shape[0]:,} rows)", progress=not args.quiet,
            negatives=negatives, negative_groups=args.negative_groups, matmul_precision=args.matmul_precision,
        )
    if args.knn_bank:
        from deltakern.data.arrays import file_sha256, load_embeddings, split_key
        from deltakern.ood.knn import knn_score

        bank = load_embeddings(args.knn_bank, name="--knn-bank", dim=W.shape[1]).to(device)
        inputs["knn_bank"] = _info(bank, path=str(split_key(args.knn_bank)[0]), sha256=file_sha256(split_key(args.knn_bank)[0]))
        for name, X in sets.items():
            columns[name]["knn"] = knn_score(X.to(device), bank, k=args.knn_k).float().cpu()
        extra_scores.append("knn")
    id_cols = columns.pop("ID")
    sweep = [f"{base}@c={c}" for base in ("delta_energy", "delta_energy_joint") for c in range(1, args.c + 1)]
    evaluation = evaluate_sets(
        id_cols, columns, tpr=args.tpr, positive=args.positive, scores=list(SCORE_LABELS) + extra_scores + sweep,
        id_pred=id_cols["pred"] if labels is not None else None, id_labels=labels, progress=not args.quiet,
    )
    print()
    print(evaluation.table())
    if args.c > 1:
        print()
        print(evaluation.c_table())
    if args.out:
        meta = {
            "deltakern": __version__,
            "torch": torch.__version__,
            "command": "deltakern eval",
            "settings": {
                "temperature": args.temperature, "c": args.c, "reset": args.reset,
                "mcm_temperature": args.mcm_temperature, "backend": backend, "device": str(device),
                "matmul_precision": args.matmul_precision,
                "tpr": args.tpr, "positive": args.positive,
                "knn_k": args.knn_k if args.knn_bank else None,
                "negative_groups": args.negative_groups if negatives is not None else None,
                "negative_labels": negative_labels,
            },
            "inputs": inputs,
        }
        written = write_report(evaluation, args.out, meta, plots=not args.no_plots)
        if written["plots_skipped"] and not args.no_plots:
            print(f"plots skipped: {written['plots_skipped']}")
        print(f"\nwrote {len(written['files'])} files to {args.out}")
    return 0
