"""The EBM loss (docs/conventions.md §6): ``dk.ebm_loss`` and the ``dk.EBMLoss`` module.

Per row, ``L = CE + lam · (LSE(ℓ̃) − LSE(ℓ))``, where ``ℓ̃`` equals the logits ``ℓ`` except that
the target column holds the edited (masked, clamped) cosine over τ. Minimising the second term
maximises a lower bound of ΔE_1, the energy change when the top logit is reset.

Two paths compute it:
- the fused custom ops ``deltakern::ebm_loss_forward`` / ``deltakern::ebm_loss_backward``
  (C++ on CPU, CUDA on GPU), which never hold more than a chunk of the ``[N, K]`` logits: the
  forward keeps O(N) numbers per row (and the [N, D] mask), the backward recomputes the logits
  chunk by chunk and turns each chunk into its logit gradient on the fly;
- the plain-PyTorch reference (``deltakern.reference.loss``) when the extension is not loaded.
Schemas are declared in csrc/ops.cpp; ``deltakern.ops.registry`` adds their fake kernels and
autograd and is the only caller of the ops.
"""

from __future__ import annotations

import torch
from torch import nn

from deltakern.core.ebm import combine, masked_count, validate_settings
from deltakern.ops import registry
from deltakern.reference.loss import per_row_parts, validate


def fused_available(device: torch.device | str) -> bool:
    """True when the fused loss ops have a kernel for tensors on ``device``."""
    return registry.has_device_kernel("ebm_loss_forward", device)


def _rescales_rows(X: object) -> bool:
    """Whether the path that runs for ``X`` normalises tiny and huge rows robustly: the compiled
    CPU ops and the reference do; the CUDA ops' row preparation is robust too but has not been
    checked on a GPU yet, so rows there must still have a float32 sum of squares that neither
    under- nor overflows."""
    if not isinstance(X, torch.Tensor) or X.device.type == "cpu":
        return True
    return not fused_available(X.device)


def _fused_parts(X, W, labels, *, temperature, mask_ratio, reset, target, ce_on, normalize):
    """Per-row ``(ce, delta)`` from the fused forward op (differentiable through its autograd)."""
    return registry.ebm_loss_parts(
        X, W, labels, inv_temp=1.0 / temperature, reset=reset, mask_count=masked_count(mask_ratio, X.shape[1]),
        target_pred=target == "pred", ce_edited=ce_on == "edited", normalize=normalize,
    )


def ebm_loss(
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
    """Cross-entropy plus ``lam`` times a lower bound of −ΔE_1 (docs/conventions.md §6).

    ``X [N, D]`` are image embeddings, ``W [K, D]`` class embeddings, ``labels [N]`` integer
    classes in ``[0, K)``. Per row: logits ``ℓ = x̂ŵᵀ/τ``; the target column ``t`` is
    ``argmax ℓ`` (``target="pred"``, ties to the lower class) or the label
    (``target="label"``); the edited cosine sums ``x̂ ⊙ ŵ_t`` with its ``⌈mask_ratio·D⌉`` largest
    entries zeroed, clamped from below at ``reset``; the edited logits put it (over τ) in column
    ``t``. The loss is ``CE(ℓ or ℓ̃, y) + lam · (LSE(ℓ̃) − LSE(ℓ))`` (``ce_on="original"`` or
    ``"edited"``), reduced by ``reduction`` (``"mean"``, ``"sum"``, ``"none"``).
    ``return_parts=True`` returns ``(loss, {"ce": ..., "delta": ...})``.

    Gradients flow to ``X`` and ``W`` (whichever require grad). With the compiled extension the
    forward and backward are fused custom ops that never hold the ``[N, K]`` logits; otherwise
    the plain-PyTorch reference is used. The loss is float32 (float64 for float64 inputs).
    """
    args = validate(
        X, W, labels, rescales_rows=_rescales_rows(X), temperature=temperature, lam=lam,
        mask_ratio=mask_ratio, reset=reset, target=target, ce_on=ce_on, normalize=normalize,
        reduction=reduction, return_parts=return_parts,
    )
    parts = _fused_parts if fused_available(X.device) else per_row_parts
    ce, delta = parts(
        X, W, args["labels"], temperature=args["temperature"], mask_ratio=args["mask_ratio"],
        reset=args["reset"], target=args["target"], ce_on=args["ce_on"], normalize=args["normalize"],
    )
    return combine(ce, delta, lam=args["lam"], reduction=args["reduction"], return_parts=args["return_parts"])


class EBMLoss(nn.Module):
    """Module form of :func:`ebm_loss`, a drop-in replacement for ``nn.CrossEntropyLoss``.

    Holds the keyword arguments of :func:`ebm_loss`; ``forward(X, W, labels)`` takes the image
    embeddings, the class embeddings and the labels (rather than precomputed logits, because the
    loss needs the embeddings to build the edited logit).
    """

    def __init__(
        self,
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
    ) -> None:
        super().__init__()
        # Checked here too, so a bad setting fails where the module is built.
        validate_settings(
            temperature=temperature, lam=lam, mask_ratio=mask_ratio, reset=reset, target=target,
            ce_on=ce_on, normalize=normalize, reduction=reduction, return_parts=return_parts,
        )
        self.temperature = temperature
        self.lam = lam
        self.mask_ratio = mask_ratio
        self.reset = reset
        self.target = target
        self.ce_on = ce_on
        self.normalize = normalize
        self.reduction = reduction
        self.return_parts = return_parts

    def forward(
        self, X: torch.Tensor, W: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return ebm_loss(
            X, W, labels, temperature=self.temperature, lam=self.lam, mask_ratio=self.mask_ratio,
            reset=self.reset, target=self.target, ce_on=self.ce_on, normalize=self.normalize,
            reduction=self.reduction, return_parts=self.return_parts,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, lam={self.lam}, mask_ratio={self.mask_ratio}, "
            f"reset={self.reset}, target={self.target!r}, ce_on={self.ce_on!r}, "
            f"normalize={self.normalize}, reduction={self.reduction!r}"
        )
