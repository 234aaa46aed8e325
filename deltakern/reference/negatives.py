"""The NegLabel state in plain PyTorch (docs/conventions.md §2.5): per-row log-sum-exps of the
logits against each group of negative labels, row-chunked like the ID scoring reference, alone
(:func:`negative_lse`, a separate pass) or beside the ID state in one pass (:func:`score_neg_state`)."""

from __future__ import annotations

import torch

from deltakern.core.dtypes import accumulation_dtype, prepare_rows
from deltakern.reference.scoring import DEFAULT_CHUNK_ELEMENTS, chunk_rows, logits_chunk, reduce_logits


def group_lse(logits: torch.Tensor, groups: int) -> torch.Tensor:
    """``[rows, groups]``: the log-sum-exp of each of ``groups`` consecutive, equal column blocks."""
    return torch.logsumexp(logits.view(logits.shape[0], groups, logits.shape[1] // groups), dim=2)


def negative_lse(
    X: torch.Tensor,
    W_neg: torch.Tensor,
    *,
    temperature: float,
    groups: int,
    normalize: bool,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """``[N, groups]``: the log-sum-exp of ``X``'s logits against each of ``groups`` consecutive,
    equal blocks of the rows of ``W_neg`` (already ordered and trimmed into groups)."""
    acc = accumulation_dtype(X, W_neg)
    w_hat = prepare_rows(W_neg, acc, normalize)
    n, m = X.shape[0], W_neg.shape[0]
    out = torch.empty((n, groups), dtype=acc, device=X.device)
    step = chunk_rows(m, chunk_elements)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        out[rows] = group_lse(logits_chunk(X[rows], w_hat, temperature, normalize), groups)
    return out


def score_neg_state(
    X: torch.Tensor,
    W: torch.Tensor,
    W_neg: torch.Tensor,
    *,
    temperature: float,
    c: int,
    groups: int,
    normalize: bool,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ID state of :func:`deltakern.reference.scoring.score_state` and the ``[N, groups]``
    negative log-sum-exps of :func:`negative_lse`, from one pass over the rows of ``X``."""
    acc = accumulation_dtype(X, W, W_neg)
    w_hat, wn_hat = prepare_rows(W, acc, normalize), prepare_rows(W_neg, acc, normalize)
    n = X.shape[0]
    values = torch.empty((n, c), dtype=acc, device=X.device)
    indices = torch.empty((n, c), dtype=torch.int64, device=X.device)
    outside = torch.empty((n,), dtype=acc, device=X.device)
    lse_neg = torch.empty((n, groups), dtype=acc, device=X.device)
    step = chunk_rows(W.shape[0] + W_neg.shape[0], chunk_elements)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        values[rows], indices[rows], outside[rows] = reduce_logits(logits_chunk(X[rows], w_hat, temperature, normalize), c)
        lse_neg[rows] = group_lse(logits_chunk(X[rows], wn_hat, temperature, normalize), groups)
    return values, indices, outside, lse_neg
