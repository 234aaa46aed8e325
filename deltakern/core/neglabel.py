"""The NegLabel score (Jiang et al., ICLR 2024) from per-row log-sum-exps, in log space.

NegLabel scores an image by the share of its softmax mass (at temperature τ) that falls on the
in-distribution labels when "negative" labels mined from a large vocabulary are added beside them
(docs/conventions.md §2.5). With the negatives split into G groups, the paper averages the share
over the groups. From the ID log-sum-exp ``a = LSE(ℓ_ID)`` and the negative log-sum-exp of each
group ``b_g = LSE(ℓ_neg, group g)``:

    share_g = e^a / (e^a + e^{b_g}),    neglabel = log( (1/G) Σ_g share_g )

The score is returned as the log of the share (≤ 0, higher = more in-distribution): a confident
row, whose share is 1 − 1e-20 in exact arithmetic, keeps its digits (≈ −1e-20) where the share
itself would round to 1.0 in float32. Rankings equal those of the share.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def neglabel_log_share(lse_id: torch.Tensor, lse_neg: torch.Tensor) -> torch.Tensor:
    """``log((1/G) Σ_g e^a / (e^a + e^{b_g}))`` per row, in float64.

    ``lse_id [N]`` is the log-sum-exp of the ID logits; ``lse_neg [N, G]`` those of the G
    negative groups. Two exact forms cover the two ends: when the mean share is small, the log
    of the mean of the shares (``log share_g = −softplus(b_g − a)``); when it is close to 1,
    ``log1p(−mean(1 − share_g))`` with ``log(1 − share_g) = −softplus(a − b_g)``, which keeps the
    digits of a share of 1 − 1e-30. Nothing is subtracted from a number close to it.
    """
    a = lse_id.to(torch.float64).unsqueeze(1)
    b = lse_neg.to(torch.float64)
    log_groups = math.log(b.shape[1])
    log_mean_share = torch.logsumexp(-F.softplus(b - a), dim=1) - log_groups
    log_mean_rest = torch.logsumexp(-F.softplus(a - b), dim=1) - log_groups  # log mean(1 − share_g)
    near_one = log_mean_share > -math.log(2.0)
    return torch.where(near_one, torch.log1p(-torch.exp(log_mean_rest)), log_mean_share)


def negative_group_order(m: int, groups: int, *, seed: int = 0) -> torch.Tensor:
    """The order in which ``m`` negative labels are cut into ``groups`` equal groups.

    As in the NegLabel code, the labels are shuffled by a fixed-seed permutation and the last
    ``m mod groups`` of the shuffled order are dropped, so every group has ``m // groups`` labels:
    group g is ``order[g*size:(g+1)*size]``. Deterministic for a given ``(m, groups, seed)``; with
    one group nothing is shuffled or dropped.
    """
    if groups == 1:
        return torch.arange(m)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(m, generator=generator)
    return order[: m - m % groups]
