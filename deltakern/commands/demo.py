"""``deltakern demo``: score a reproducible synthetic CLIP-like set end to end, offline."""

from __future__ import annotations

import argparse
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="score a synthetic set of CLIP-like embeddings (runs offline, CPU or GPU)",
        description="Generate a reproducible synthetic set of CLIP-like image embeddings "
        "(in-distribution rows near their class direction, OOD rows not; a modality gap like "
        "CLIP's), score it with the best available backend, and print throughput and an ID vs "
        "OOD evaluation table.",
    )
    p.add_argument("--n", type=int, default=1_000_000, help="rows to score (default 1,000,000)")
    p.add_argument("--k", type=int, default=1000, help="classes (default 1000)")
    p.add_argument("--d", type=int, default=512, help="embedding dimension (default 512)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--ood-fraction", type=float, default=0.5, help="share of OOD rows (default 0.5)")
    p.add_argument("--c", type=int, default=3, help="top-c resets for ΔEnergy (default 3; c=1..C reported)")
    p.add_argument("--temperature", type=float, default=0.01, help="τ, cosine -> logit (default 0.01)")
    p.add_argument("--reset", type=float, default=0.0, help="reset value in cosine units (default 0)")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "cpp", "reference"])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    p.set_defaults(func=run)


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from .. import mcm, score_modes
    from ..scoring import resolve_backend
    from ..synthetic import class_embeddings, iter_blocks

    device = _device(args.device)
    W = class_embeddings(args.k, args.d, args.seed).to(device)
    backend = resolve_backend(args.backend, device, args.c)
    print(
        f"deltakern demo: N={args.n:,} rows, K={args.k}, D={args.d}, c={args.c}, "
        f"τ={args.temperature}, device={device}, backend={backend}"
    )
    kwargs = dict(temperature=args.temperature, c=args.c, reset=args.reset, backend=backend)
    parts: dict[str, list[torch.Tensor]] = {}
    score_seconds = 0.0
    with tqdm(total=args.n, unit="row", unit_scale=True, desc="scoring") as bar:
        for X, is_ood, labels in iter_blocks(args.n, args.k, args.d, args.seed, args.ood_fraction):
            X = X.to(device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            both = score_modes(X, W, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            score_seconds += time.perf_counter() - start
            # MCM is MSP at its own temperature (T = 1): a second, separately timed pass.
            mcm_block = mcm(X, W, temperature=1.0, backend=backend)
            sep, joint = both["separate"], both["joint"]
            for name, value in (
                ("delta_energy", sep.delta_energy),
                ("delta_energy_joint", joint.delta_energy),
                ("delta_energy_terms", sep.delta_energy_terms),
                ("delta_energy_joint_terms", joint.delta_energy_terms),
                ("energy", sep.energy),
                ("msp", sep.msp),
                ("mcm", mcm_block),
                ("max_logit", sep.max_logit),
                ("pred", sep.pred),
                ("is_ood", is_ood),
                ("labels", labels),
            ):
                parts.setdefault(name, []).append(value.cpu())
            bar.update(X.shape[0])
    cols = {name: torch.cat(chunks) for name, chunks in parts.items()}
    rows_per_s = args.n / score_seconds
    print(f"fused ΔEnergy pass: {score_seconds:.2f} s for {args.n:,} rows = {rows_per_s:,.0f} rows/s ({backend} on {device})")
    _summary(cols)
    return 0


def _summary(cols: dict) -> None:
    """Print accuracy and an ID vs OOD evaluation of every score."""
    is_ood = cols["is_ood"]
    id_mask = ~is_ood
    acc = (cols["pred"][id_mask] == cols["labels"][id_mask]).double().mean().item()
    print(f"ID rows: {int(id_mask.sum()):,}  OOD rows: {int(is_ood.sum()):,}  ID top-1 accuracy: {acc:.4f}")
    names = ["delta_energy", "delta_energy_joint", "energy", "msp", "mcm", "max_logit"]
    print(f"{'score':<20} {'mean ID':>10} {'mean OOD':>10}")
    for name in names:
        v = cols[name].double()
        print(f"{name:<20} {v[id_mask].mean().item():>10.4f} {v[is_ood].mean().item():>10.4f}")
