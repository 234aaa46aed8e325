"""Reproducible synthetic CLIP-like embeddings for demos, tests and benchmarks.

The geometry mimics what CLIP ViT-B models show on ImageNet-scale class sets:

- a modality gap: every text embedding shares a "text" direction and every image embedding an
  "image" direction, at cosine ``MODALITY_COS`` from each other, so unrelated image/text pairs
  still have cosine ≈ 0.18 and matched pairs ≈ 0.23-0.41 (logits ≈ 18 vs 23-41 at τ = 0.01);
- in-distribution rows lean towards their class direction with a strength drawn per row (some
  rows are confident, some ambiguous); out-of-distribution rows lean only weakly towards a random
  class (near-OOD) or none;
- row norms vary (CLIP features are not unit length), which exercises the normalisation.

Rows are generated in fixed blocks with one generator per (seed, block), so a set is identical
however it is streamed and whatever device scores it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from deltakern.core.errors import InvalidArgument

BLOCK_ROWS = 65_536
MODALITY_COS = 0.3
TEXT_SHARED, TEXT_CLASS = 0.75, 0.66
IMAGE_SHARED, IMAGE_NOISE = 0.8, 0.5
ID_STRENGTH = (0.08, 0.35)
OOD_STRENGTH = (0.0, 0.12)


@dataclass(frozen=True)
class SyntheticSet:
    """A whole synthetic set: classes ``W [K, D]``, rows ``X [N, D]``, ``is_ood [N]`` and
    ``labels [N]`` (the class of an ID row, -1 for OOD rows)."""

    W: torch.Tensor
    X: torch.Tensor
    is_ood: torch.Tensor
    labels: torch.Tensor


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / torch.linalg.vector_norm(t, dim=-1, keepdim=True)


def _geometry(k: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image direction [D], text direction [D], class directions [K, D]) for a seed."""
    if d < 3:
        raise InvalidArgument(f"d must be >= 3 for the synthetic geometry, got {d}")
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))
    text_dir = basis[:, 0]
    image_dir = MODALITY_COS * basis[:, 0] + math.sqrt(1 - MODALITY_COS**2) * basis[:, 1]
    class_dirs = _unit(torch.randn(k, d, generator=g, dtype=torch.float64))
    return image_dir, text_dir, class_dirs


def class_embeddings(k: int = 1000, d: int = 512, seed: int = 0) -> torch.Tensor:
    """The synthetic text (class) embeddings ``[K, D]`` float32, unit norm."""
    _, text_dir, class_dirs = _geometry(k, d, seed)
    return _unit(TEXT_SHARED * text_dir + TEXT_CLASS * class_dirs).float()


def _block(index: int, rows: int, n_ood: int, image_dir, class_dirs, seed: int):
    k, d = class_dirs.shape
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (index + 1))
    labels = torch.randint(0, k, (rows,), generator=g)
    lo_id, hi_id = ID_STRENGTH
    lo_ood, hi_ood = OOD_STRENGTH
    u = torch.rand(rows, generator=g)
    is_ood = torch.zeros(rows, dtype=torch.bool)
    is_ood[:n_ood] = True
    is_ood = is_ood[torch.randperm(rows, generator=g)]
    strength = torch.where(is_ood, lo_ood + (hi_ood - lo_ood) * u, lo_id + (hi_id - lo_id) * u)
    # float32 from here on: generating float64 noise would dominate the demo's run time.
    noise = torch.randn(rows, d, generator=g).mul_(IMAGE_NOISE / math.sqrt(d))
    scale = 0.5 + 1.5 * torch.rand(rows, 1, generator=g)
    x = noise.add_(class_dirs[labels].float().mul_(strength[:, None])).add_(IMAGE_SHARED * image_dir.float())
    labels = torch.where(is_ood, torch.full_like(labels, -1), labels)
    return x.mul_(scale), is_ood, labels


def iter_blocks(
    n: int = 1_000_000, k: int = 1000, d: int = 512, seed: int = 0, ood_fraction: float = 0.5
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Stream the rows as ``(X_block [B, D], is_ood [B], labels [B])`` blocks of up to
    ``BLOCK_ROWS`` rows, without holding the whole set in memory."""
    if not 0.0 <= ood_fraction <= 1.0:
        raise InvalidArgument(f"ood_fraction must lie in [0, 1], got {ood_fraction}")
    if n < 1 or k < 1:
        raise InvalidArgument(f"n and k must be >= 1, got n={n}, k={k}")
    image_dir, _, class_dirs = _geometry(k, d, seed)
    for index, start in enumerate(range(0, n, BLOCK_ROWS)):
        rows = min(BLOCK_ROWS, n - start)
        # Exact OOD count per block so the overall fraction does not depend on chance.
        n_ood = round((start + rows) * ood_fraction) - round(start * ood_fraction)
        yield _block(index, rows, n_ood, image_dir, class_dirs, seed)


def make_synthetic(
    n: int = 10_000, k: int = 1000, d: int = 512, seed: int = 0, ood_fraction: float = 0.5
) -> SyntheticSet:
    """The whole synthetic set in memory (use :func:`iter_blocks` for millions of rows)."""
    blocks = list(iter_blocks(n, k, d, seed, ood_fraction))
    return SyntheticSet(
        W=class_embeddings(k, d, seed),
        X=torch.cat([b[0] for b in blocks]),
        is_ood=torch.cat([b[1] for b in blocks]),
        labels=torch.cat([b[2] for b in blocks]),
    )
