"""The negative-label half of the NegLabel state in plain PyTorch: per-row log-sum-exps of the
logits against each group of negative labels, row-chunked like the ID scoring reference."""

from __future__ import annotations

import torch

from deltakern.core.dtypes import accumulation_dtype, prepare_rows
from deltakern.reference.scoring import DEFAULT_CHUNK_ELEMENTS, chunk_rows


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
        logits = prepare_rows(X[rows], acc, normalize) @ w_hat.T / temperature
        out[rows] = torch.logsumexp(logits.view(logits.shape[0], groups, m // groups), dim=2)
    return out
