"""From the per-row scoring state to every score of docs/conventions.md §2.

Every backend (reference, C++, Triton) reduces a row of logits to the same O(c) state:
the sorted top-c logits, their class indices, and the log-sum-exp of the logits outside the
top-c. This module turns that state into the scores, in float64 and entirely in log space, so
no edited log-sum-exp is ever formed by subtracting exponentials (which would lose every digit
for confident rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from deltakern.core.errors import InvalidArgument


@dataclass(frozen=True)
class Scores:
    """Per-row scores of ``dk.score`` (higher = more in-distribution, logit units).

    Float fields are float32 (float64 when the inputs were float64); indices are int64; all
    tensors live on the input device.
    """

    delta_energy: torch.Tensor  # [N]
    delta_energy_terms: torch.Tensor  # [N, c]
    energy: torch.Tensor  # [N]
    max_logit: torch.Tensor  # [N]
    msp: torch.Tensor  # [N]
    pred: torch.Tensor  # [N] int64
    topk_values: torch.Tensor  # [N, c] logits
    topk_indices: torch.Tensor  # [N, c] int64
    # log of NegLabel's ID share of the softmax mass (docs/conventions.md §2.5); None unless
    # negative labels were given
    neglabel: torch.Tensor | None = None  # [N]

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The fields that are present (not None) as a plain ``{name: tensor}`` dict."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def __len__(self) -> int:
        return int(self.pred.shape[0])


def _column(like: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full((like.shape[0], 1), value, dtype=like.dtype, device=like.device)


def derive_scores(
    topk_values: torch.Tensor,
    topk_indices: torch.Tensor,
    lse_outside: torch.Tensor,
    *,
    reset_logit: float,
    mode: str,
    out_dtype: torch.dtype = torch.float32,
) -> Scores:
    """Compute all scores from the top-c state.

    With v the sorted top-c logits, o the outside log-sum-exp and r the reset logit:
    ``energy = LSE(v, o)``; separate mode replaces v_i alone:
    ``LSE(v_1..v_{i-1}, v_{i+1}..v_c, r, o)``; joint mode replaces v_1..v_i together:
    ``LSE(v_{i+1}..v_c, i copies of r, o)``. Prefix/suffix log-sum-exps come from
    ``torch.logcumsumexp``, so every term is a sum of positive quantities.
    """
    if mode not in ("separate", "joint"):  # validated by the public functions; a guard for internal callers
        raise InvalidArgument(f"mode must be 'separate' or 'joint', got {mode!r}")
    if topk_values.shape[1] == 1:
        return _derive_top1(topk_values, topk_indices, lse_outside, reset_logit=reset_logit, out_dtype=out_dtype)
    return _derive(topk_values, topk_indices, lse_outside, reset_logit=reset_logit, mode=mode, out_dtype=out_dtype)


def _derive(topk_values, topk_indices, lse_outside, *, reset_logit, mode, out_dtype) -> Scores:
    """:func:`derive_scores` for any c (prefix and suffix log-sum-exps over the top-c)."""
    v = topk_values.to(torch.float64)
    outside = lse_outside.to(torch.float64)
    c = v.shape[1]
    neg_inf = _column(v, -math.inf)

    prefix = torch.logcumsumexp(v, dim=1)  # LSE(v_1..v_i)
    suffix = torch.logcumsumexp(v.flip(1), dim=1).flip(1)  # LSE(v_i..v_c)
    suffix_after = torch.cat([suffix[:, 1:], neg_inf], dim=1)  # LSE(v_{i+1}..v_c)
    energy = torch.logaddexp(prefix[:, -1], outside)

    if mode == "separate":
        prefix_before = torch.cat([neg_inf, prefix[:, :-1]], dim=1)  # LSE(v_1..v_{i-1})
        rest = torch.logaddexp(outside, torch.full_like(outside, reset_logit)).unsqueeze(1)
        edited = torch.logaddexp(torch.logaddexp(prefix_before, suffix_after), rest)
    elif mode == "joint":
        counts = torch.arange(1, c + 1, dtype=torch.float64, device=v.device)
        resets = (torch.log(counts) + reset_logit).unsqueeze(0)  # log(i * e^r)
        edited = torch.logaddexp(torch.logaddexp(suffix_after, resets), outside.unsqueeze(1))

    terms = energy.unsqueeze(1) - edited
    delta = terms.sum(dim=1) if mode == "separate" else terms[:, -1]
    return _scores(delta, terms, energy, v[:, 0], topk_values, topk_indices, out_dtype)


def _derive_top1(topk_values, topk_indices, lse_outside, *, reset_logit, out_dtype) -> Scores:
    """:func:`derive_scores` for c = 1 (the default), in a third of the tensor operations: both
    modes reset the one top logit, ``edited = LSE(r, o)``, and every prefix or suffix of the
    top-1 list is v itself or empty. Bit-identical to :func:`_derive` with c = 1 (an empty LSE
    is -inf, and ``logaddexp(-inf, x)`` is x exactly), which the tests check."""
    v = topk_values.to(torch.float64)
    outside = lse_outside.to(torch.float64)
    energy = torch.logaddexp(v[:, 0], outside)
    terms = energy.unsqueeze(1) - torch.logaddexp(outside, torch.full_like(outside, reset_logit)).unsqueeze(1)
    return _scores(terms[:, 0], terms, energy, v[:, 0], topk_values, topk_indices, out_dtype)


def _scores(delta, terms, energy, top1, topk_values, topk_indices, out_dtype) -> Scores:
    """The :class:`Scores` of both derivations from their float64 results (MSP = exp(top1 - energy))."""
    return Scores(
        delta_energy=delta.to(out_dtype),
        delta_energy_terms=terms.to(out_dtype),
        energy=energy.to(out_dtype),
        max_logit=top1.to(out_dtype),
        msp=torch.exp(top1 - energy).to(out_dtype),
        pred=topk_indices[:, 0].to(torch.int64),
        topk_values=topk_values.to(out_dtype),
        topk_indices=topk_indices.to(torch.int64),
    )
