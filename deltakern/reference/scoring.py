"""Plain eager PyTorch implementation of the scores (docs/conventions.md §2): the oracle and the fallback backend.

Rows are processed in chunks so that memory stays O(chunk·K): each chunk's logits are
computed with one matmul, reduced to the top-c state (ties go to the lower class index) and the
log-sum-exp of the remaining logits, then discarded.
"""

from __future__ import annotations

import math

import torch

from deltakern.core.dtypes import accumulation_dtype, prepare_rows

DEFAULT_CHUNK_ELEMENTS = 1 << 22  # logits held at once (16 MB in float32)


def chunk_rows(k: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Rows per chunk so that a chunk's logits hold about ``chunk_elements`` values."""
    return max(1, chunk_elements // max(k, 1))


def logits_chunk(x: torch.Tensor, w_hat: torch.Tensor, temperature: float, normalize: bool) -> torch.Tensor:
    """Cosine (or dot-product) logits of a chunk of rows against prepared class rows."""
    return prepare_rows(x, w_hat.dtype, normalize) @ w_hat.T / temperature


def top_c(logits: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The c largest entries of each row, sorted descending, ties to the lower column index.

    ``torch.topk`` does not specify which of several equal values it returns, so the boundary
    is rebuilt exactly: every entry above the c-th value, plus the lowest-index entries equal to
    it; a stable sort of that set (taken in column order) then orders ties by index. This costs a
    few passes over the row instead of sorting all K entries.
    """
    threshold = logits.topk(c, dim=1).values[:, -1:]
    above = logits > threshold
    equal = logits == threshold
    need = c - above.sum(dim=1, keepdim=True)
    chosen = above | (equal & (torch.cumsum(equal, dim=1) <= need))
    columns = torch.nonzero(chosen)[:, 1].view(logits.shape[0], c)  # ascending per row
    values, order = torch.sort(logits.gather(1, columns), dim=1, descending=True, stable=True)
    return values, columns.gather(1, order)


def reduce_logits(logits: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A chunk of logits reduced to its top-c logits, their indices and the outside log-sum-exp."""
    top_v, top_i = top_c(logits, c)
    rest = logits.scatter(1, top_i, -math.inf)
    return top_v, top_i, torch.logsumexp(rest, dim=1)


def score_state(
    X: torch.Tensor,
    W: torch.Tensor,
    *,
    temperature: float,
    c: int,
    normalize: bool,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-c logits [N, c], their indices [N, c] and the outside log-sum-exp [N]."""
    acc = accumulation_dtype(X, W)
    w_hat = prepare_rows(W, acc, normalize)
    n, k = X.shape[0], W.shape[0]
    values = torch.empty((n, c), dtype=acc, device=X.device)
    indices = torch.empty((n, c), dtype=torch.int64, device=X.device)
    outside = torch.empty((n,), dtype=acc, device=X.device)
    step = chunk_rows(k, chunk_elements)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        logits = logits_chunk(X[rows], w_hat, temperature, normalize)
        values[rows], indices[rows], outside[rows] = reduce_logits(logits, c)
    return values, indices, outside
