"""A plain Triton GEMM with the fused scoring kernel's tiles: the control it is measured against.

``logits = X @ Wᵀ`` with the same ``BLOCK_M × BLOCK_N × BLOCK_K`` tiles, warps, stages and
products (``tl.dot`` with the same input precision) as :mod:`deltakern.ops.triton.fused_score`
picks for the dtype and c, written the textbook way: one program per (row tile, class tile)
and a single loop over D, no epilogue, the logits stored in the input dtype (as ``torch.mm``
stores them). Two uses:

- the compile-only check (:mod:`deltakern.ops.triton.compiled`) compiles it beside the fused
  kernel, so the fused kernel's operand buffers, registers and instruction counts are read
  against what Triton gives a plain GEMM of the same tiles;
- the GPU benchmark (``bench/bench_gpu_score.py``, provider ``triton-gemm``) times it: an upper
  bound for the fused kernel, since it does the same products with none of the epilogue.

Not a scorer: it returns raw dot products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltakern.core.errors import InvalidArgument
from deltakern.ops.triton.fused_score import TileConfig, _dot_dtype, dot_precision, select_config


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, out_ptr,
    N, K, D,
    stride_xn, stride_xd, stride_wk, stride_wd, stride_on,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    col_ok = cols < K
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None] * stride_xn
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = (k0 + offs_k) < D
        x = tl.load(x_rows + (k0 + offs_k)[None, :] * stride_xd, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + (k0 + offs_k)[:, None] * stride_wd, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    tl.store(out_ptr + rows[:, None] * stride_on + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def kernel_arguments(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, allow_tf32: bool = False) -> tuple[tuple, dict]:
    """Positional and compile-time arguments of one launch, as :func:`logits` passes them."""
    dot_dtype = _dot_dtype(x, w)
    args = (x, w, out, x.shape[0], w.shape[0], x.shape[1], x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0))
    meta = dict(UPCAST=x.dtype != w.dtype, PRECISION=dot_precision(x.device, dot_dtype, allow_tf32))
    return args, meta


def logits(
    X: torch.Tensor, W: torch.Tensor, *, c: int = 1, out: torch.Tensor | None = None,
    config: TileConfig | None = None, allow_tf32: bool = False,
) -> torch.Tensor:
    """``X @ Wᵀ`` [N, K] in X's dtype with the fused kernel's tiles for this dtype and ``c``
    (or ``config``), written into ``out`` when given (a reusable buffer). CUDA tensors with
    unit stride along D."""
    if X.dim() != 2 or W.dim() != 2 or X.shape[1] != W.shape[1]:
        raise InvalidArgument(f"X [N, D] and W [K, D] must share D, got {tuple(X.shape)} and {tuple(W.shape)}")
    n, k = X.shape[0], W.shape[0]
    if out is None:
        out = torch.empty((n, k), dtype=X.dtype, device=X.device)
    cfg = config or select_config(X.device, _dot_dtype(X, W), c)
    args, meta = kernel_arguments(X.contiguous(), W.contiguous(), out, allow_tf32)
    grid = (triton.cdiv(n, cfg.block_m), triton.cdiv(k, cfg.block_n))
    _gemm_kernel[grid](*args, **meta, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                       num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
