"""``deltakern models``: the open_clip architectures and pretrained tags, offline."""

from __future__ import annotations

import argparse

EXAMPLE = """\
examples:
  deltakern models                 # architectures with published weights and their tags
  deltakern models vit-b           # only names containing 'vit-b' (any case)
  deltakern models --all           # also architectures without published weights
  deltakern models --model ViT-B-32

--model NAME --pretrained TAG of `deltakern score`, `encode` and `train` take these names. Tags
are listed from open_clip's registry without network access; the weights of a tag are
downloaded on first use (or read from the local cache). An architecture without published
weights takes a local checkpoint file, or `none` (random weights, for tests).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list open_clip architectures and their pretrained tags (offline)",
        description="List the open_clip architectures (--model) and their pretrained tags "
        "(--pretrained) from open_clip's registry, offline; with --model NAME, the tags of NAME or "
        "the nearest names when it is unknown.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("pattern", nargs="?", metavar="PATTERN", help="show only names containing PATTERN (any case)")
    p.add_argument("--all", action="store_true", help="also list architectures without published weights")
    p.add_argument("--model", metavar="NAME", help="the tags of one architecture (nearest names when unknown)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import open_clip

    from deltakern.clip.models import TINY_MODEL, check_model, register_tiny_model

    register_tiny_model()
    if args.model is not None:
        check_model(args.model, "none")  # an unknown name raises, naming the nearest ones
        tags = [] if args.model == TINY_MODEL else open_clip.list_pretrained_tags_by_model(args.model)
        print(f"{args.model}: " + (", ".join(tags) if tags else "no published weights (a local checkpoint file, or none)"))
        return 0
    pattern = (args.pattern or "").lower()
    rows = []
    for name in open_clip.list_models():
        if pattern not in name.lower():
            continue
        tags = [] if name == TINY_MODEL else open_clip.list_pretrained_tags_by_model(name)
        if tags or args.all or name == TINY_MODEL:
            rows.append((name, ", ".join(tags) if tags else ("random weights for tests (--pretrained none)" if name == TINY_MODEL else "-")))
    if not rows:
        print(f"no architecture name contains {args.pattern!r}" + ("" if args.all else " among those with published weights (try --all)"))
        return 1
    width = max(len(name) for name, _ in rows)
    for name, tags in rows:
        print(f"{name:<{width}}  {tags}")
    with_tags = sum(1 for _, t in rows if t != "-" and not t.startswith("random"))
    print(f"\n{len(rows)} architectures ({with_tags} with published weights); use as --model NAME --pretrained TAG")
    return 0
