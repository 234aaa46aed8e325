"""The one place where the compiled custom ops meet Python.

The schemas are declared once, in ``csrc/ops.cpp`` (``TORCH_LIBRARY(deltakern, m)``); the C++ and
CUDA kernels register themselves per dispatch key. This module adds, once, when the extension
has loaded, what ``torch.library`` needs on the Python side:

- fake (meta) kernels for shape propagation (``torch.compile``, ``opcheck``),
- the autograd formula of ``ebm_loss_forward`` (its backward is ``ebm_loss_backward``),
- the image preprocessing op's fake kernel (``resample_crop_normalize``, used by
  ``deltakern.clip.preprocess``),

and the thin call wrappers the public functions use, so no other module touches
``torch.ops.deltakern`` or the dispatcher directly. The Triton op
``deltakern::fused_score_state_triton`` is declared with its kernel in
``deltakern/ops/triton/fused_score.py`` (``torch.library.triton_op`` needs the kernel at hand).
"""

from __future__ import annotations

import functools
import threading

import torch

from deltakern.core.dtypes import accumulation_dtype
from deltakern.ops import extension

_LOSS_OPS = ("deltakern::ebm_loss_forward", "deltakern::ebm_loss_backward")
_PREPROCESS_OP = "deltakern::resample_crop_normalize"
_DISPATCH_KEYS = ("CPU", "CUDA", "Meta", "Autograd", "AutogradCPU", "AutogradCUDA")
_lock = threading.Lock()
_registered: bool | None = None  # None: not tried yet


def ensure_registered() -> bool:
    """Register every op's Python side once; False when the extension is unavailable."""
    global _registered
    if _registered is not None:
        return _registered
    with _lock:
        if _registered is None:
            _registered = extension.available() and _register_all()
    return _registered


def _op_names() -> set[str]:
    return {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("deltakern::")}


def _register_all() -> bool:
    names = _op_names()
    if "deltakern::fused_score_state" in names:
        _register_score_ops()
    # An extension built before the loss ops existed still serves scoring.
    if all(op in names for op in _LOSS_OPS):
        _register_loss_ops()
    if _PREPROCESS_OP in names:
        _register_preprocess_op()
    return True


def _register_score_ops() -> None:
    @torch.library.register_fake("deltakern::fused_score_state")
    def _fused_score_state_fake(x, w, inv_temp, c, normalize, bf16_products=False):
        acc = accumulation_dtype(x, w)
        n = x.shape[0]
        return (
            x.new_empty((n, c), dtype=acc),
            x.new_empty((n, c), dtype=torch.int64),
            x.new_empty((n,), dtype=acc),
        )

    if "deltakern::fused_score_neg_state" in _op_names():

        @torch.library.register_fake("deltakern::fused_score_neg_state")
        def _fused_score_neg_state_fake(x, w, w_neg, inv_temp, c, groups, normalize, bf16_products=False):
            top_v, top_i, outside = _fused_score_state_fake(x, w, inv_temp, c, normalize)
            return top_v, top_i, outside, x.new_empty((x.shape[0], groups), dtype=top_v.dtype)


def _register_loss_ops() -> None:
    @torch.library.register_fake("deltakern::ebm_loss_forward")
    def _forward_fake(x, w, labels, inv_temp, reset, mask_count, target_pred, ce_edited, normalize):
        acc = accumulation_dtype(x, w)
        n = x.shape[0]
        row = x.new_empty((n,), dtype=acc)
        return (
            row,  # ce
            torch.empty_like(row),  # delta
            torch.empty_like(row),  # lse
            torch.empty_like(row),  # lse_other
            x.new_empty((n,), dtype=torch.int64),  # target
            torch.empty_like(row),  # edited cosine (before the clamp)
            x.new_empty((n, x.shape[1]), dtype=torch.bool),  # keep mask
        )

    @torch.library.register_fake("deltakern::ebm_loss_backward")
    def _backward_fake(
        grad_ce, grad_delta, x, w, labels, target, lse, lse_other, edited, keep,
        inv_temp, reset, ce_edited, normalize, needs_x, needs_w,
    ):
        dx = x.new_empty(x.shape if needs_x else (0,))
        dw = w.new_empty(w.shape if needs_w else (0,))
        return dx, dw

    def _setup_context(ctx, inputs, output):
        x, w, labels, inv_temp, reset, _count, _pred, ce_edited, normalize = inputs
        _ce, _delta, lse, lse_other, target, edited, keep = output
        ctx.save_for_backward(x, w, labels, target, lse, lse_other, edited, keep)
        ctx.options = (inv_temp, reset, ce_edited, normalize)
        ctx.mark_non_differentiable(lse, lse_other, target, edited, keep)

    def _backward(ctx, grad_ce, grad_delta, *_unused):
        x, w, labels, target, lse, lse_other, edited, keep = ctx.saved_tensors
        inv_temp, reset, ce_edited, normalize = ctx.options
        needs_x, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (needs_x or needs_w):
            return (None,) * 9
        grad_ce = torch.zeros_like(lse) if grad_ce is None else grad_ce
        grad_delta = torch.zeros_like(lse) if grad_delta is None else grad_delta
        dx, dw = torch.ops.deltakern.ebm_loss_backward(
            grad_ce, grad_delta, x, w, labels, target, lse, lse_other, edited, keep,
            inv_temp, reset, ce_edited, normalize, needs_x, needs_w,
        )
        return (dx if needs_x else None, dw if needs_w else None) + (None,) * 7

    torch.library.register_autograd("deltakern::ebm_loss_forward", _backward, setup_context=_setup_context)


def _register_preprocess_op() -> None:
    @torch.library.register_fake(_PREPROCESS_OP)
    def _resample_crop_normalize_fake(image, height, width, top, left, crop_height, crop_width, filter, vertical_first,
                                      mean, std):
        return image.new_empty((3, crop_height, crop_width), dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """True when ``deltakern::op_name`` has a kernel for the dispatch key (e.g. "CPU").

    Cached: the compiled ops are registered once, when the extension loads, and listing every
    dispatcher op to find them costs tens of milliseconds, too much for each ``dk.score`` call."""
    if not ensure_registered():
        return False
    qualified = f"deltakern::{op_name}"
    return qualified in _op_names() and torch._C._dispatch_has_kernel_for_dispatch_key(qualified, dispatch_key)


def has_device_kernel(op_name: str, device: torch.device | str) -> bool:
    """True when ``deltakern::op_name`` has a kernel for tensors on ``device``."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return key is not None and has_kernel(op_name, key)


def registered_ops() -> dict[str, list[str]]:
    """``{op: [dispatch keys with a kernel]}`` for every deltakern op (for ``deltakern env``)."""
    if not ensure_registered():
        return {}
    ops = {}
    for qualified in sorted(_op_names()):
        keys = [k for k in _DISPATCH_KEYS if torch._C._dispatch_has_kernel_for_dispatch_key(qualified, k)]
        ops[qualified.split("::", 1)[1]] = keys
    return ops


def fused_score_state(
    x: torch.Tensor, w: torch.Tensor, inv_temp: float, c: int, normalize: bool, bf16_products: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Call the compiled ``deltakern::fused_score_state`` op: ``(top-c logits, their indices,
    outside log-sum-exp)``. ``bf16_products`` lets float32 inputs multiply in bfloat16 on CPUs
    with native bf16 (matmul_precision "high"/"medium")."""
    ensure_registered()
    return torch.ops.deltakern.fused_score_state(x, w, inv_temp, c, normalize, bf16_products)


def fused_score_neg_state(
    x: torch.Tensor, w: torch.Tensor, w_neg: torch.Tensor, inv_temp: float, c: int, groups: int, normalize: bool,
    bf16_products: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Call the compiled ``deltakern::fused_score_neg_state`` op: the three outputs of
    :func:`fused_score_state` and the ``[N, groups]`` log-sum-exps against the negative groups
    (consecutive equal blocks of the rows of ``w_neg``), from one pass over ``x``."""
    ensure_registered()
    return torch.ops.deltakern.fused_score_neg_state(x, w, w_neg, inv_temp, c, groups, normalize, bf16_products)


def ebm_loss_parts(
    x: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    *,
    inv_temp: float,
    reset: float,
    mask_count: int,
    target_pred: bool,
    ce_edited: bool,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(ce, delta)`` of the EBM loss from the fused forward op, differentiable through
    its registered autograd (the backward op)."""
    ensure_registered()
    out = torch.ops.deltakern.ebm_loss_forward(
        x, w, labels, inv_temp, reset, mask_count, target_pred, ce_edited, normalize
    )
    return out[0], out[1]


def resample_crop_normalize(
    image: torch.Tensor, size: tuple[int, int], crop: tuple[int, int, int, int], *, filter: str, vertical_first: bool,
    mean: list[float], std: list[float],
) -> torch.Tensor:
    """Call the compiled ``deltakern::resample_crop_normalize`` op: the uint8 ``[H, W, 3]`` image
    resized to ``size`` = (height, width) with PIL's ``filter`` ("bicubic" or "bilinear"; its
    vertical pass first when ``vertical_first``), cropped to ``crop`` = (top, left, height, width)
    and normalised, as float32 ``[3, crop height, crop width]``."""
    ensure_registered()
    top, left, crop_height, crop_width = crop
    return torch.ops.deltakern.resample_crop_normalize(
        image, size[0], size[1], top, left, crop_height, crop_width, filter, vertical_first, mean, std
    )
