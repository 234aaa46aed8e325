"""Float64 evaluation of docs/conventions.md §2 straight from the definitions, for small inputs.

Independent of deltakern's own code paths: full logits matrix, explicit edits, logsumexp (NegLabel
borrows only the fixed-seed group order, which is part of its definition).
"""

from __future__ import annotations

import math

import torch

from deltakern.core.constants import score_tolerance
from deltakern.core.neglabel import negative_group_order


def unit_rows64(t: torch.Tensor) -> torch.Tensor:
    """Rows of a float64 tensor at unit L2 norm; divided by their largest |value| first, so a
    row as tiny as 1e-300 (whose squares underflow float64) is normalised too."""
    t = t / t.abs().amax(dim=1, keepdim=True)
    return t / t.norm(dim=1, keepdim=True)


def logits64(X: torch.Tensor, W: torch.Tensor, temperature: float, normalize: bool = True) -> torch.Tensor:
    x, w = X.double(), W.double()
    if normalize:
        x, w = unit_rows64(x), unit_rows64(w)
    return (x @ w.T) / temperature


def order(logits: torch.Tensor) -> torch.Tensor:
    """Class indices by decreasing logit, ties to the lower index."""
    return torch.sort(logits, dim=1, descending=True, stable=True).indices


def scores64(X, W, *, temperature=0.01, c=1, reset=0.0, mode="separate", normalize=True) -> dict:
    ell = logits64(X, W, temperature, normalize)
    idx = order(ell)[:, :c]
    r = reset / temperature
    energy = torch.logsumexp(ell, dim=1)
    terms = []
    for i in range(c):
        edited = ell.clone()
        if mode == "separate":
            edited.scatter_(1, idx[:, i : i + 1], r)
        else:
            edited.scatter_(1, idx[:, : i + 1], r)
        terms.append(energy - torch.logsumexp(edited, dim=1))
    terms = torch.stack(terms, dim=1)
    top = ell.gather(1, idx)
    return {
        "energy": energy,
        "delta_energy_terms": terms,
        "delta_energy": terms.sum(1) if mode == "separate" else terms[:, -1],
        "max_logit": top[:, 0],
        "msp": torch.exp(top[:, 0] - energy),
        "pred": idx[:, 0],
        "topk_values": top,
        "topk_indices": idx,
        "logits": ell,
    }


def tolerance(dtype: torch.dtype) -> float:
    """Accuracy contract (docs/conventions.md §3): relative or absolute, whichever is larger."""
    return score_tolerance(dtype)


def assert_close_contract(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    tol = tolerance(dtype)
    a, e = actual.double().cpu(), expected.double().cpu()
    bound = torch.clamp(e.abs() * tol, min=tol)
    err = (a - e).abs()
    bad = err > bound
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} values outside the contract (tol {tol}); worst error "
        f"{float(err.max()):.3e} at value {float(e.flatten()[int(err.argmax())]):.6g}"
    )


def assert_indices_match(actual_idx, expected_idx, logits64_: torch.Tensor, dtype: torch.dtype) -> None:
    """Indices match except where the two candidates' logits are within tolerance."""
    a, e = actual_idx.cpu(), expected_idx.cpu()
    mismatch = a != e
    if not bool(mismatch.any()):
        return
    la = logits64_.cpu().gather(1, a)
    le = logits64_.cpu().gather(1, e)
    tol = tolerance(dtype)
    gap = (la - le).abs()
    allowed = gap <= torch.clamp(le.abs() * tol, min=tol) * 2
    assert bool(allowed[mismatch].all()), f"index mismatch beyond ties: gaps {gap[mismatch][:5]}"


def confident_rows(n: int, k: int, d: int, *, seed: int = 0, gap: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose top-1 cosine beats the rest by ``gap`` (top-1 probability > 1 - 1e-12 at τ=0.01)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(k, d, generator=g)
    W = W / W.norm(dim=1, keepdim=True)
    labels = torch.randint(0, k, (n,), generator=g)
    X = W[labels] * 4.0 + 0.05 * torch.randn(n, d, generator=g) * math.sqrt(d) / math.sqrt(d)
    return X, W


def neglabel64(X, W, N, *, temperature, groups):
    """log of the mean over groups of sum(e^ID) / (sum(e^ID) + sum(e^neg_g)), float64, direct."""
    x = torch.nn.functional.normalize(X.double(), dim=1)
    lid = x @ torch.nn.functional.normalize(W.double(), dim=1).T / temperature
    order = negative_group_order(N.shape[0], groups)
    lneg = (x @ torch.nn.functional.normalize(N.double(), dim=1)[order].T / temperature).view(X.shape[0], groups, -1)
    a = torch.logsumexp(lid, 1)[:, None]
    b = torch.logsumexp(lneg, 2)
    share = 1.0 / (1.0 + torch.exp(b - a))  # plain float64 arithmetic with exponentials
    rest = 1.0 / (1.0 + torch.exp(a - b))  # 1 - share, without forming 1 - share
    mean_share, mean_rest = share.mean(1), rest.mean(1)
    return torch.where(mean_share > 0.5, torch.log1p(-mean_rest), torch.log(mean_share))
