"""Public scoring functions: validation, backend choice, dispatch, the ``Scores`` result
(docs/conventions.md §2-§4)."""

from __future__ import annotations

import dataclasses
import warnings

import torch

from deltakern.core.constants import BACKENDS, MATMUL_PRECISIONS, MODES, TRITON_MAX_C
from deltakern.core.dtypes import SAFE_ROW_EXPONENT, accumulation_dtype, rescale_rows, row_max_abs, unit_row_exponents
from deltakern.core.errors import InvalidArgument
from deltakern.core.neglabel import negative_group_order, neglabel_log_share
from deltakern.core.state import Scores, derive_scores
from deltakern.core.validation import (
    check_bool,
    check_choice,
    check_finite_number,
    check_int_range,
    check_matrix,
    check_pair,
    check_temperature,
    check_values,
)
from deltakern.ops import extension, registry
from deltakern.ops.triton import triton_status
from deltakern.reference import scoring as reference
from deltakern.reference.negatives import negative_lse, score_neg_state

__all__ = [
    "BACKENDS", "MODES", "Scores", "available_backends", "backend_status", "delta_energy", "energy",
    "max_logit", "mcm", "msp", "resolve_backend", "score", "score_modes",
]


def backend_status(device: torch.device | str) -> dict[str, str | None]:
    """``{backend: None if usable on device else the reason it is not}`` (auto excluded)."""
    device = torch.device(device)
    status: dict[str, str | None] = {"triton": triton_status(device)}
    if not extension.available():
        status["cpp"] = f"the compiled extension is not loaded ({extension.unavailable_reason()})"
    elif device.type != "cpu":
        status["cpp"] = "the C++ scoring kernel runs on CPU tensors (CUDA uses the Triton kernel)"
    elif not registry.has_kernel("fused_score_state", "CPU"):
        status["cpp"] = "the extension has no CPU kernel for fused_score_state"
    else:
        status["cpp"] = None
    status["reference"] = None
    return status


def available_backends(device: torch.device | str) -> list[str]:
    """The backends usable for tensors on ``device``, in the order ``auto`` prefers them."""
    return [name for name, reason in backend_status(device).items() if reason is None]


def resolve_backend(backend: str, device: torch.device | str, c: int = 1) -> str:
    """The concrete backend ``backend`` means for ``device``; raises naming the usable ones."""
    check_choice("backend", backend, BACKENDS)
    device = torch.device(device)
    status = backend_status(device)
    usable = [name for name, reason in status.items() if reason is None]
    if backend == "auto":
        chosen = usable[0]
        # Interpreted Triton is a test vehicle, never the automatic choice on CPU.
        if chosen == "triton" and device.type == "cpu":
            chosen = usable[1]
    elif status[backend] is not None:
        raise InvalidArgument(
            f"backend={backend!r} is not available for {device.type} tensors: {status[backend]}; "
            f"available: {', '.join(repr(b) for b in usable)}"
        )
    else:
        chosen = backend
    if chosen == "triton" and c > TRITON_MAX_C:
        warnings.warn(
            f"c={c} exceeds the Triton kernel's limit of {TRITON_MAX_C}; using the reference backend",
            stacklevel=3,
        )
        chosen = "reference"
    return chosen


def _state(X, W, negatives, groups, *, temperature, c, normalize, backend, matmul_precision):
    """``(top-c logits, their indices, outside LSE, [N, groups] negative LSEs or None)`` from one
    pass of the chosen backend over X (the negatives, when given, in the same pass)."""
    reduced = matmul_precision != "highest"
    if backend == "cpp":
        if negatives is None:
            return (*registry.fused_score_state(X, W, 1.0 / temperature, c, normalize, reduced), None)
        if registry.has_kernel("fused_score_neg_state", "CPU"):
            return registry.fused_score_neg_state(X, W, negatives, 1.0 / temperature, c, groups, normalize, reduced)
        # An extension built before the NegLabel op: the ID state fused, the negatives in a
        # second (reference) pass.
        state = registry.fused_score_state(X, W, 1.0 / temperature, c, normalize, reduced)
        return (*state, negative_lse(X, negatives, temperature=temperature, groups=groups, normalize=normalize))
    if backend == "triton":
        from deltakern.ops.triton import fused_score  # lazy: imports triton

        if negatives is None:
            state = fused_score.fused_score_state(
                X, W, inv_temp=1.0 / temperature, c=c, normalize=normalize, allow_tf32=reduced
            )
            return (*state, None)
        return fused_score.fused_score_neg_state(
            X, W, negatives, inv_temp=1.0 / temperature, c=c, groups=groups, normalize=normalize,
            allow_tf32=reduced,
        )
    if negatives is None:
        return (*reference.score_state(X, W, temperature=temperature, c=c, normalize=normalize), None)
    return score_neg_state(X, W, negatives, temperature=temperature, c=c, groups=groups, normalize=normalize)


def _within_safe_range(t: torch.Tensor, amax: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` itself, or a copy whose rows with a largest |value| outside
    ``2**±SAFE_ROW_EXPONENT`` are multiplied by a power of two (exact; no cosine changes).

    The Triton kernel normalises with a plain float32 sum of squares, which underflows for tiny
    rows (rows of 1e-23 would look like zero rows, rows of 1e-21 lose digits) and overflows for
    huge ones; after this step it sees rows it normalises within the contract. The C++ op and the
    reference scale rows robustly themselves, so they are spared this extra pass over X.
    ``amax``: the rows' largest |value| when the caller has it (from the value check).
    """
    exponents = unit_row_exponents(t, amax)
    outside = exponents.abs() > SAFE_ROW_EXPONENT
    if not bool(outside.any()):
        return t
    return rescale_rows(t, torch.where(outside, exponents, torch.zeros_like(exponents)))


def score_modes(
    X: torch.Tensor,
    W: torch.Tensor,
    *,
    modes: tuple[str, ...] = MODES,
    temperature: float = 0.01,
    c: int = 1,
    reset: float = 0.0,
    normalize: bool = True,
    backend: str = "auto",
    matmul_precision: str = "highest",
    negatives: torch.Tensor | None = None,
    negative_groups: int = 1,
    allow_tf32: bool | None = None,
) -> dict[str, Scores]:
    """Like :func:`score`, for several ΔEnergy modes from ONE pass over the data.

    Both modes derive from the same per-row top-c state, so ``{"separate": ..., "joint": ...}``
    costs one kernel launch. Returns ``{mode: Scores}`` in the order of ``modes``. Inference
    only, like :func:`score`: the outputs carry no autograd graph.
    """
    # Scores are inference-only on every backend (docs/conventions.md §8.3): no graph is built
    # even when X or W require grad, so the C++ and Triton ops (no backward) and the reference
    # (which would build one) behave alike. dk.ebm_loss is the differentiable objective.
    matmul_precision = _matmul_precision(matmul_precision, allow_tf32, stacklevel=3)
    with torch.no_grad():
        return _score_modes(
            X, W, modes=modes, temperature=temperature, c=c, reset=reset, normalize=normalize,
            backend=backend, matmul_precision=matmul_precision, negatives=negatives,
            negative_groups=negative_groups,
        )


def _matmul_precision(matmul_precision: str, allow_tf32: bool | None, *, stacklevel: int) -> str:
    """The checked ``matmul_precision``; the deprecated ``allow_tf32`` maps onto it with a warning
    (True → "high", False → "highest") and may not contradict an explicit setting."""
    check_choice("matmul_precision", matmul_precision, MATMUL_PRECISIONS)
    if allow_tf32 is None:
        return matmul_precision
    allow_tf32 = check_bool("allow_tf32", allow_tf32)
    mapped = "high" if allow_tf32 else "highest"
    warnings.warn(
        f"allow_tf32 is deprecated and will be removed in the next release; use "
        f"matmul_precision={mapped!r} (the same on every backend: docs/conventions.md §3.4)",
        FutureWarning,
        stacklevel=stacklevel + 1,
    )
    if matmul_precision != "highest" and matmul_precision != mapped:
        raise InvalidArgument(
            f"allow_tf32={allow_tf32} contradicts matmul_precision={matmul_precision!r}; pass matmul_precision only",
            param="allow_tf32",
        )
    return mapped


def _grouped_negatives(negatives: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """The negative labels in group order (fixed-seed shuffle, ``M mod groups`` dropped;
    docs/conventions.md §2.5) and in ``dtype``: a new tensor, the caller's rows stay as given."""
    order = negative_group_order(negatives.shape[0], groups).to(negatives.device)
    return negatives.index_select(0, order).to(dtype)


def _score_modes(
    X, W, *, modes, temperature, c, reset, normalize, backend, matmul_precision, negatives, negative_groups
) -> dict[str, Scores]:
    normalize = check_bool("normalize", normalize)
    X, W = check_matrix("X", X), check_matrix("W", W)
    check_pair(X, W)
    # Each row's largest |value|: one pass over each matrix serves the value check and, on the
    # Triton path, the safe-range scaling (each made its own two passes over X before).
    w_amax = row_max_abs(W)
    W = check_values("W", W, normalize=normalize, rescales_rows=True, amax=w_amax)
    temperature = check_temperature("temperature", temperature)
    c = check_int_range("c", c, 1, W.shape[0])
    reset = check_finite_number("reset", reset)
    if isinstance(modes, str) or not modes:
        raise InvalidArgument(f"modes must be a non-empty tuple of {MODES}, got {modes!r}")
    modes = tuple(check_choice("mode", m, MODES) for m in modes)
    if negatives is not None:
        negatives = check_matrix("negatives", negatives)
        check_pair(X, negatives, ("X", "negatives"))
        negatives = check_values("negatives", negatives, normalize=normalize, rescales_rows=True)
        negative_groups = check_int_range("negative_groups", negative_groups, 1, negatives.shape[0])
        # One class dtype for both matrices (the kernels multiply X by each in the same way):
        # the wider of the two, so that neither loses digits.
        common = torch.promote_types(W.dtype, negatives.dtype)
        w_amax = w_amax.to(common) if W.dtype != common else w_amax
        W = W.to(common)
        negatives = _grouped_negatives(negatives, negative_groups, common)
    chosen = resolve_backend(backend, X.device, c)
    if chosen == "triton" and torch.float64 in (X.dtype, W.dtype):
        # The Triton kernel multiplies in float32 at most; float64 inputs keep float64 end to
        # end through the reference. Say so when Triton was asked for by name.
        if backend == "triton":
            warnings.warn("float64 inputs are scored by the reference backend (the Triton kernel is float32 at most)", stacklevel=3)
        chosen = "reference"
    # X's values: the C++ op checks them while it reads them (NaN/±inf and zero rows raise; every
    # finite non-zero row is normalised robustly), so with normalize the cpp backend is spared a
    # separate pass over X (at small K it cost as much as the op) and the check runs only to name
    # the argument when the op refuses.
    x_checked_by_op = normalize and chosen == "cpp"
    x_amax = None
    if not x_checked_by_op:
        x_amax = row_max_abs(X)
        X = check_values("X", X, normalize=normalize, rescales_rows=True, amax=x_amax)
    if normalize and chosen == "triton":
        X, W = _within_safe_range(X, x_amax), _within_safe_range(W, w_amax)
        negatives = None if negatives is None else _within_safe_range(negatives)
    try:
        top_v, top_i, outside, lse_neg = _state(
            X, W, negatives, negative_groups, temperature=temperature, c=c, normalize=normalize,
            backend=chosen, matmul_precision=matmul_precision,
        )
    except RuntimeError:
        if x_checked_by_op:
            check_values("X", X, normalize=normalize, rescales_rows=True)  # the error, naming X
        raise
    out_dtype = accumulation_dtype(X, W)
    results = {
        m: derive_scores(top_v, top_i, outside, reset_logit=reset / temperature, mode=m, out_dtype=out_dtype)
        for m in modes
    }
    if lse_neg is None:
        return results
    lse_id = torch.logaddexp(torch.logsumexp(top_v.to(torch.float64), dim=1), outside.to(torch.float64))
    neglabel = neglabel_log_share(lse_id, lse_neg).to(out_dtype)
    return {m: dataclasses.replace(r, neglabel=neglabel) for m, r in results.items()}


def score(
    X: torch.Tensor,
    W: torch.Tensor,
    *,
    temperature: float = 0.01,
    c: int = 1,
    reset: float = 0.0,
    mode: str = "separate",
    normalize: bool = True,
    backend: str = "auto",
    matmul_precision: str = "highest",
    negatives: torch.Tensor | None = None,
    negative_groups: int = 1,
    allow_tf32: bool | None = None,
) -> Scores:
    """Score image embeddings ``X [N, D]`` against class embeddings ``W [K, D]``.

    Returns a :class:`Scores` with ΔEnergy (its per-rank terms), energy, max-logit, MSP, the
    predicted class and the top-c logits/indices of every row, all in logit units, higher =
    in-distribution. ``temperature`` τ scales cosines to logits (0.01 = CLIP's logit scale 100);
    ``reset`` is the cosine value the top-c logits are reset to; ``mode`` is ``"separate"``
    (sum of single resets) or ``"joint"`` (reset the top-c together). ``backend`` is
    ``"auto"``, ``"triton"`` (CUDA), ``"cpp"`` (CPU extension) or ``"reference"``.
    ``matmul_precision`` (as in ``torch.set_float32_matmul_precision``) is ``"highest"``
    (float32-level accuracy, the default) or ``"high"``/``"medium"``, which let float32 inputs
    multiply in plain TF32 on CUDA and in bfloat16 on CPUs with native bf16: faster, outside the
    float32 contract (docs/conventions.md §3.4). ``allow_tf32`` is its deprecated predecessor.
    The [N, K] logits matrix is never stored; inputs are not modified.
    Scores are inference-only: they are computed without autograd on every backend and carry
    no graph even when ``X`` or ``W`` require grad (use :func:`deltakern.ebm_loss` for a
    differentiable objective). Any finite non-zero row is normalised within the accuracy
    contract, however tiny or huge (it is rescaled by a power of two first).

    ``negatives [M, D]`` (negative-label embeddings, e.g. mined by
    :func:`deltakern.clip.negatives.mine_negative_labels`) adds the NegLabel score
    (``Scores.neglabel``: the log of the ID share of the softmax mass over ID plus negative
    labels, averaged over ``negative_groups`` fixed-seed groups; docs/conventions.md §2.5). Every
    other field stays over the ID classes only and is unchanged by ``negatives``.
    """
    check_choice("mode", mode, MODES)
    return score_modes(
        X, W, modes=(mode,), temperature=temperature, c=c, reset=reset, normalize=normalize,
        backend=backend, matmul_precision=_matmul_precision(matmul_precision, allow_tf32, stacklevel=2),
        negatives=negatives, negative_groups=negative_groups,
    )[mode]


def delta_energy(X: torch.Tensor, W: torch.Tensor, **kwargs) -> torch.Tensor:
    """ΔEnergy per row ``[N]`` (same keyword arguments as :func:`score`)."""
    return score(X, W, **kwargs).delta_energy


def energy(X: torch.Tensor, W: torch.Tensor, **kwargs) -> torch.Tensor:
    """Energy score ``LSE(logits)`` per row ``[N]`` (same keyword arguments as :func:`score`)."""
    return score(X, W, **kwargs).energy


def max_logit(X: torch.Tensor, W: torch.Tensor, **kwargs) -> torch.Tensor:
    """Largest logit per row ``[N]`` (same keyword arguments as :func:`score`)."""
    return score(X, W, **kwargs).max_logit


def msp(X: torch.Tensor, W: torch.Tensor, **kwargs) -> torch.Tensor:
    """Maximum softmax probability at temperature τ per row ``[N]``."""
    return score(X, W, **kwargs).msp


def mcm(X: torch.Tensor, W: torch.Tensor, *, temperature: float = 1.0, **kwargs) -> torch.Tensor:
    """MCM score (Ming et al. 2022): the maximum softmax probability at its own temperature
    ``T`` (default 1.0) of the cosine similarities, per row ``[N]``."""
    return score(X, W, temperature=temperature, **kwargs).msp
