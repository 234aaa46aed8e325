"""Plain eager PyTorch implementation of the EBM loss (docs/conventions.md §6); autograd does its backward.

This is the oracle the fused custom ops are tested against and the fallback used when the
compiled extension is not loaded. It is written straight from the definition and holds the
full ``[N, K]`` logits matrix (and autograd keeps several more of that size), so it is meant
for small problems and for checking.
"""

from __future__ import annotations

import torch

from deltakern.core.dtypes import accumulation_dtype, prepare_rows
from deltakern.core.ebm import combine, masked_count, validate_settings
from deltakern.core.validation import check_bool, check_inputs, check_labels


def validate(X: object, W: object, labels: object, *, rescales_rows: bool = True, **settings: object) -> dict:
    """Check every argument of the EBM loss (docs/conventions.md §8) as :func:`deltakern.core.ebm.validate`
    does; return the settings as plain types plus ``labels`` as int64.

    ``rescales_rows``: the path that will run normalises rows robustly (this reference and the
    compiled CPU ops do: an exact power-of-two rescaling or a double-precision sum of squares),
    so with ``normalize=True`` every finite non-zero row is accepted, however tiny or huge.
    Without it, rows whose plain float32 sum of squares under- or overflows are refused.
    """
    normalize = check_bool("normalize", settings.get("normalize"))
    X, W = check_inputs(X, W, normalize=normalize, rescales_rows=rescales_rows)
    labels = check_labels(labels, X.shape[0], W.shape[0], X.device)
    return dict(labels=labels, **validate_settings(**settings))


def per_row_parts(
    X: torch.Tensor,
    W: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    mask_ratio: float,
    reset: float,
    target: str,
    ce_on: str,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy and ΔEnergy-bound term ``([N], [N])`` of docs/conventions.md §6, no validation."""
    acc = accumulation_dtype(X, W)
    x_hat = prepare_rows(X, acc, normalize)
    w_hat = prepare_rows(W, acc, normalize)
    logits = x_hat @ w_hat.T / temperature
    # The target column is a discrete choice: no gradient flows through argmax or the labels.
    # torch.argmax returns the first maximal index, i.e. ties go to the lower class.
    t = logits.detach().argmax(dim=1) if target == "pred" else labels
    product = x_hat * w_hat[t]
    # Mask the ceil(rho*D) largest products; a stable descending sort puts the lower dimension
    # first among equal products. The mask itself carries no gradient.
    count = masked_count(mask_ratio, product.shape[1])
    order = torch.sort(product.detach(), dim=1, descending=True, stable=True).indices
    keep = torch.ones_like(product, dtype=torch.bool).scatter(1, order[:, :count], False)
    edited_cos = (product * keep).sum(dim=1)
    edited_logit = torch.clamp_min(edited_cos, reset) / temperature
    edited = logits.scatter(1, t[:, None], edited_logit[:, None])
    lse = torch.logsumexp(logits, dim=1)
    lse_edited = torch.logsumexp(edited, dim=1)
    delta = lse_edited - lse
    ce_logits = logits if ce_on == "original" else edited
    ce = torch.nn.functional.cross_entropy(ce_logits, labels, reduction="none")
    return ce, delta


def ebm_loss_reference(
    X: torch.Tensor,
    W: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 0.01,
    lam: float = 1.0,
    mask_ratio: float = 0.5,
    reset: float = 0.0,
    target: str = "pred",
    ce_on: str = "original",
    normalize: bool = True,
    reduction: str = "mean",
    return_parts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The EBM loss of docs/conventions.md §6 in plain PyTorch (same signature as :func:`deltakern.ebm_loss`).

    ``L = CE + lam · (LSE(edited logits) − LSE(logits))`` per row, reduced by ``reduction``;
    with ``return_parts`` also ``{"ce": ..., "delta": ...}`` reduced the same way. Gradients
    come from autograd through the full ``[N, K]`` logits.
    """
    args = validate(
        X, W, labels, temperature=temperature, lam=lam, mask_ratio=mask_ratio, reset=reset,
        target=target, ce_on=ce_on, normalize=normalize, reduction=reduction,
        return_parts=return_parts,
    )
    ce, delta = per_row_parts(
        X, W, args["labels"], temperature=args["temperature"], mask_ratio=args["mask_ratio"],
        reset=args["reset"], target=args["target"], ce_on=args["ce_on"], normalize=args["normalize"],
    )
    return combine(ce, delta, lam=args["lam"], reduction=args["reduction"], return_parts=args["return_parts"])
