"""Fused cosine logits + online top-c + outside log-sum-exp in one Triton pass (docs/architecture.md §4).

One program owns ``BLOCK_M`` rows of ``X``. It walks the classes in tiles of ``BLOCK_N`` rows
of ``W``; each tile's ``X_tile @ W_tileᵀ`` accumulates in float32 over ``BLOCK_K``-wide slices
of the embedding, is scaled to logits in the epilogue (inverse row norms and 1/τ) and merged
into per-row register state:

- the top-c logits and their class indices (c ≤ 16, a compile-time constant),
- an online (max, scaled sum) log-sum-exp of every logit *outside* the current top-c: a logit
  pushed out of the top-c joins that sum, so nothing is ever subtracted (docs/conventions.md §2).

Only O(c) numbers per row reach memory; the [N, K] logits never exist. The epilogue works in
base 2 (logits pre-multiplied by log2(e), so ``exp2`` needs no extra multiply) and converts
back when it stores.

The products run in one flat loop over (class tile, D slice) pairs, with the epilogue when a
class tile's last slice is in. Triton's software pipeliner keeps later iterations' loads in
flight only within the loop it pipelines: with a loop over class tiles around a loop over D it
pipelines the inner loop alone, refilling the pipeline at every class tile and never
overlapping the epilogue with loads; the flat loop keeps the next tile's first slices in flight
through the epilogue. Compiled for sm_90 and sm_80 as a launch compiles it (D and row strides
multiples of 16), every tile config of :func:`tile_config` keeps 2–3 copies of the operand tiles
in shared memory, like the plain GEMM of the same tiles, uses tensor cores and does not spill;
``tests/test_triton_compile.py`` checks this from the compiled code. Tensor descriptors (TMA),
a resident X tile and a persistent grid were evaluated and not taken: docs/architecture.md §4
has the compiled numbers. An embedding width that is not a multiple of 16 cannot be loaded with
vector copies, so its operands stay single-buffered (correct, slower); CLIP widths are all
multiples of 16.

With ``TRITON_INTERPRET=1`` set before triton is imported, the same kernel runs on CPU tensors
through Triton's interpreter (this is how the CPU test suite checks it). Triton fixes the mode
when it is imported (its own library functions are jitted then), so one process is either
interpreted or compiled.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from deltakern.core.constants import MAX_INV_TEMPERATURE
from deltakern.core.constants import TRITON_MAX_C as MAX_C
from deltakern.core.errors import InvalidArgument, InvalidArgumentType

OP_NAME = "deltakern::fused_score_state_triton"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634  # host side: folded into the logit scale
_LN2 = tl.constexpr(0.6931471805599453)  # kernel side: base-2 results back to natural log


# --------------------------------------------------------------------------------------------
# Device functions
# --------------------------------------------------------------------------------------------


@triton.jit
def _add_to_outside(m, s, values):
    """Fold ``values`` [BM] (base-2 logits, may be -inf) into the running (max, sum) pair."""
    m_new = tl.maximum(m, values)
    # A row that has seen only -inf keeps m = -inf; shifting by 0 then gives exp2(-inf) = 0
    # instead of the NaN of (-inf) - (-inf).
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp2(m - shift) + tl.exp2(values - shift)
    return m_new, s


@triton.jit
def _add_tile_to_outside(m, s, tile):
    """Fold every element of ``tile`` [BM, BN] into the running (max, sum) pair."""
    m_new = tl.maximum(m, tl.max(tile, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp2(m - shift) + tl.sum(tl.exp2(tile - shift[:, None]), axis=1)
    return m_new, s


@triton.jit
def _merge_top1(best_v, best_i, m, s, logits, col0, BLOCK_N: tl.constexpr):
    """c = 1: one max/argmax, the tile minus its winner into the outside sum, loser of the two
    winners too. Tiles arrive in increasing class order, so on equal values the kept winner
    (lower class index) stays."""
    offs_n = tl.arange(0, BLOCK_N)
    tile_v, tile_j = tl.max(logits, axis=1, return_indices=True, return_indices_tie_break_left=True)
    rest = tl.where(offs_n[None, :] == tile_j[:, None], float("-inf"), logits)
    m, s = _add_tile_to_outside(m, s, rest)
    tile_wins = tile_v > best_v
    m, s = _add_to_outside(m, s, tl.where(tile_wins, best_v, tile_v))
    best_i = tl.where(tile_wins, col0 + tile_j, best_i)
    best_v = tl.where(tile_wins, tile_v, best_v)
    return best_v, best_i, m, s


@triton.jit
def _worst_slot(top_v, top_i, slot_ok):
    """The slot of the lowest-ranked kept logit: smallest value, on ties the highest index.
    Returns its value [BM] and a one-hot slot mask [BM, C_PAD]."""
    worst_v = tl.min(tl.where(slot_ok, top_v, float("inf")), axis=1)
    is_min = slot_ok & (top_v == worst_v[:, None])
    worst_i = tl.max(tl.where(is_min, top_i, -(2**31)), axis=1)
    return worst_v, is_min & (top_i == worst_i[:, None])


@triton.jit
def _merge_topc(top_v, top_i, m, s, logits, col0, C: tl.constexpr, C_PAD: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """1 < c ≤ 16: the kept list is unordered (sorted once at the end). Only tile logits above
    a row's current c-th best can enter, so the tile needs at most min(c, max count) rounds of
    extract-max; each round replaces the worst kept logit (which joins the outside sum) or, if
    the extracted one loses, adds it to the outside sum. What is left of the tile joins too."""
    offs_n = tl.arange(0, BLOCK_N)
    slot_ok = (tl.arange(0, C_PAD) < C)[None, :]
    worst_v, worst_slot = _worst_slot(top_v, top_i, slot_ok)
    entrants = tl.sum((logits > worst_v[:, None]).to(tl.int32), axis=1)
    rounds = tl.minimum(tl.max(entrants, axis=0), C)
    work = logits
    for _ in range(0, rounds):
        v, j = tl.max(work, axis=1, return_indices=True, return_indices_tie_break_left=True)
        work = tl.where(offs_n[None, :] == j[:, None], float("-inf"), work)
        # Strictly greater: an equal kept logit has the lower class index and ranks first.
        enters = v > worst_v
        m, s = _add_to_outside(m, s, tl.where(enters, worst_v, v))
        replace = worst_slot & enters[:, None]
        top_v = tl.where(replace, v[:, None], top_v)
        top_i = tl.where(replace, (col0 + j)[:, None], top_i)
        worst_v, worst_slot = _worst_slot(top_v, top_i, slot_ok)
    m, s = _add_tile_to_outside(m, s, work)
    return top_v, top_i, m, s


@triton.jit
def _fused_score_kernel(
    x_ptr, w_ptr, w_scale_ptr, top_v_ptr, top_i_ptr, lse_ptr,
    wn_ptr, wn_scale_ptr, lse_neg_ptr,  # negative labels (HAS_NEG); else unused
    N, K, D, G, S,  # G negative groups of S consecutive rows of wn
    stride_xn, stride_xd, stride_wk, stride_wd, stride_wnk, stride_wnd,
    logit_scale,  # 1/τ · log2(e): cosines (or dot products) to base-2 logits
    C: tl.constexpr, C_PAD: tl.constexpr,
    NORMALIZE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_NEG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # int64 row offsets: N·stride and N·c exceed 2^31 for large inputs.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None] * stride_xn

    # Per-row scale folded into the epilogue: 1/(τ‖x‖) (log2 units). Padding rows get 0 so
    # their logits stay finite (they are never stored).
    if NORMALIZE:
        sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k_ok = (k0 + offs_k) < D
            x = tl.load(x_rows + (k0 + offs_k)[None, :] * stride_xd,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            sumsq += tl.sum(x * x, axis=1)
        row_scale = tl.where(row_ok, logit_scale / tl.sqrt_rn(tl.where(row_ok, sumsq, 1.0)), 0.0)
    else:
        row_scale = tl.where(row_ok, logit_scale, 0.0)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], dtype=tl.float32)
    if C == 1:
        best_v = tl.full([BLOCK_M], float("-inf"), tl.float32)
        best_i = tl.zeros([BLOCK_M], dtype=tl.int32)
    else:
        top_v = tl.full([BLOCK_M, C_PAD], float("-inf"), tl.float32)
        # Distinct placeholder indices keep the worst-slot choice one-hot before the list fills.
        top_i = tl.zeros([BLOCK_M, C_PAD], dtype=tl.int32) - 1 - tl.arange(0, C_PAD)[None, :]

    # One flat loop over (class tile, D slice) instead of a loop over class tiles around a loop
    # over D: the software pipeliner then keeps the next tiles' loads in flight through the
    # epilogue, where a nested loop refills its pipeline at every class tile (module docstring).
    num_k = tl.cdiv(D, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(0, tl.cdiv(K, BLOCK_N) * num_k):
        kt = t % num_k
        n0 = (t // num_k) * BLOCK_N
        k0 = kt * BLOCK_K
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < K
        k_ok = (k0 + offs_k) < D
        x = tl.load(x_rows + (k0 + offs_k)[None, :] * stride_xd,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols.to(tl.int64)[None, :] * stride_wk + (k0 + offs_k)[:, None] * stride_wd,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:  # mixed input dtypes: multiply in float32
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if kt == num_k - 1:  # the class tile is complete: scale, merge, start the next one
            if NORMALIZE:
                col_scale = tl.load(w_scale_ptr + cols, mask=col_ok, other=0.0)
                logits = acc * row_scale[:, None] * col_scale[None, :]
            else:
                logits = acc * row_scale[:, None]
            logits = tl.where(col_ok[None, :], logits, float("-inf"))
            if C == 1:
                best_v, best_i, m, s = _merge_top1(best_v, best_i, m, s, logits, n0, BLOCK_N)
            else:
                top_v, top_i, m, s = _merge_topc(top_v, top_i, m, s, logits, n0, C, C_PAD, BLOCK_N)
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    lse = tl.where(s > 0, (m + tl.log2(tl.where(s > 0, s, 1.0))) * _LN2, float("-inf"))
    tl.store(lse_ptr + rows, lse, mask=row_ok)

    if HAS_NEG:
        # NegLabel: the same rows against the negative labels, group by group, in the same
        # program (the rows' norms are reused and their tiles are still in cache). One flat
        # loop over (group, column tile, D slice), as above; each group keeps an online
        # log-sum-exp that is stored when its last tile is in.
        tiles = tl.cdiv(S, BLOCK_N)
        gm = tl.full([BLOCK_M], float("-inf"), tl.float32)
        gs = tl.zeros([BLOCK_M], dtype=tl.float32)
        for t in range(0, G * tiles * num_k):
            kt = t % num_k
            tile = t // num_k
            g = tile // tiles
            cols = (tile % tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < S
            k0 = kt * BLOCK_K
            k_ok = (k0 + offs_k) < D
            x = tl.load(x_rows + (k0 + offs_k)[None, :] * stride_xd,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wn_cols = (g * S + cols).to(tl.int64)
            w = tl.load(wn_ptr + wn_cols[None, :] * stride_wnk + (k0 + offs_k)[:, None] * stride_wnd,
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
            if kt == num_k - 1:
                if NORMALIZE:
                    col_scale = tl.load(wn_scale_ptr + wn_cols, mask=col_ok, other=0.0)
                    logits = acc * row_scale[:, None] * col_scale[None, :]
                else:
                    logits = acc * row_scale[:, None]
                logits = tl.where(col_ok[None, :], logits, float("-inf"))
                gm, gs = _add_tile_to_outside(gm, gs, logits)
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                if tile % tiles == tiles - 1:  # the group is complete
                    tl.store(lse_neg_ptr + rows * G + g, (gm + tl.log2(gs)) * _LN2, mask=row_ok)
                    gm = tl.full([BLOCK_M], float("-inf"), tl.float32)
                    gs = tl.zeros([BLOCK_M], dtype=tl.float32)

    if C == 1:
        tl.store(top_v_ptr + rows, best_v * _LN2, mask=row_ok)
        tl.store(top_i_ptr + rows, best_i.to(tl.int64), mask=row_ok)
    else:
        # Sort the kept list once: c rounds of pick-the-best (ties to the lower class index).
        slot_ok = (tl.arange(0, C_PAD) < C)[None, :]
        for r in tl.static_range(C):
            v = tl.max(tl.where(slot_ok, top_v, float("-inf")), axis=1)
            i = tl.min(tl.where(slot_ok & (top_v == v[:, None]), top_i, 2**31 - 1), axis=1)
            tl.store(top_v_ptr + rows * C + r, v * _LN2, mask=row_ok)
            tl.store(top_i_ptr + rows * C + r, i.to(tl.int64), mask=row_ok)
            slot_ok = slot_ok & (top_i != i[:, None])


_autotuned = None  # the autotuned wrapper, built on first use with DELTAKERN_AUTOTUNE=1


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileConfig:
    """Block sizes and launch parameters of one kernel launch."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def autotune_enabled() -> bool:
    """True when DELTAKERN_AUTOTUNE=1: the launch config is tuned per (K, D, c, dtype)."""
    return os.environ.get("DELTAKERN_AUTOTUNE", "0") == "1"


def select_config(device: torch.device, dot_dtype: torch.dtype, c: int, negatives: bool = False) -> TileConfig:
    """The fixed tile config for ``device`` (by compute capability), dtype, c and whether the
    launch has NegLabel negatives; small tiles that exercise every masking path under the
    interpreter."""
    if device.type != "cuda":
        return TileConfig(32, 32, 32, 1, 1)
    return tile_config(torch.cuda.get_device_capability(device), dot_dtype, c, negatives)


def tile_config(capability: tuple[int, int], dot_dtype: torch.dtype, c: int, negatives: bool = False) -> TileConfig:
    """The fixed tile config for a GPU generation (compute capability), dtype, c and launch kind
    (``negatives``: the NegLabel variant, with a second loop over the negative labels).

    Larger c keeps more per-row state live in the epilogue, so it uses narrower column tiles.
    float32 inputs run three TF32 products per tile (3xTF32) on twice the bytes, so they use
    shallower K slices and, on sm_80, 64-column tiles at every c (253–255 registers, no spill).
    On sm_80, 16-bit inputs with c > 1 use 64-wide K slices: with 32-wide ones ptxas keeps the
    kernel at 128 registers and spills 12–52 bytes, with 64-wide ones it uses ~170 and none.
    Every config here compiles without register spills, with multi-buffered operand tiles and
    within the target's shared memory for sm_80 and sm_90 (Triton 3.8 and 3.6;
    tests/test_triton_compile.py checks the compiled code, docs/architecture.md §4).
    On sm_90 with 16-bit inputs and c = 1 the class tiles are 256 wide: on an H200 (bench/RESULTS.md,
    tile sweep) the kernel took 3.09 ms at N = 1e6, K = 1000, D = 512 against 3.84 ms with 128-wide
    ones, the fastest of 16 configs (253 registers, no spills). The NegLabel variant keeps the
    128-wide tiles: with 256-wide ones it spills 52 B on sm_90 (Triton 3.8).
    """
    major = capability[0]
    half = dot_dtype in (torch.float16, torch.bfloat16)
    if major >= 9:  # Hopper and newer: 228 KB shared memory, wgmma
        if half and c == 1 and not negatives:
            return TileConfig(128, 256, 64, 8, 3)
        return TileConfig(128, 128 if c == 1 else 64, 64 if half else 32, 8, 3)
    if major == 8:  # Ampere/Ada: consumer parts have ~100 KB shared memory
        if half:
            return TileConfig(128, 128, 32, 8, 3) if c == 1 else TileConfig(128, 64, 64, 8, 3)
        return TileConfig(128, 64, 32, 8, 3)
    return TileConfig(64, 64, 32, 4, 2)


def dot_precision(device: torch.device, dot_dtype: torch.dtype, allow_tf32: bool) -> str:
    """``tl.dot`` input precision: 3xTF32 (float32-level accuracy) for float32 products unless
    plain TF32 is allowed; IEEE on GPUs without TF32 tensor cores. Half products are exact."""
    if dot_dtype != torch.float32:
        return "tf32"  # ignored for 16-bit operands
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        return "ieee"
    return "tf32" if allow_tf32 else "tf32x3"


# Autotuning candidates. Checked compiled for sm_90 at c = 16 (the most epilogue state): 16-bit
# products compile every one without spills; 3xTF32 float32 products spill (8-788 B) in every
# candidate with 64-wide K slices or 4 warps, so float32 launches tune over the others only.
# (128, 256, 64) and (256, 128, 64) spilled 84-2008 B for every dtype and are not candidates.
AUTOTUNE_TILES = (
    TileConfig(128, 128, 64, 8, 3), TileConfig(128, 128, 32, 8, 4), TileConfig(128, 64, 64, 8, 3),
    TileConfig(128, 64, 64, 4, 4), TileConfig(64, 128, 64, 4, 3), TileConfig(64, 64, 64, 4, 4),
    TileConfig(128, 64, 32, 8, 3), TileConfig(128, 64, 32, 4, 3),
)


def autotune_tiles(float32_products: bool) -> list[TileConfig]:
    """The autotuning candidates for 16-bit or float32 (3xTF32 / TF32) products."""
    if not float32_products:
        return list(AUTOTUNE_TILES)
    return [t for t in AUTOTUNE_TILES if t.block_k == 32 and t.num_warps == 8]


def _autotune_configs() -> list:
    return [triton.Config({"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_K": t.block_k},
                          num_warps=t.num_warps, num_stages=t.num_stages) for t in AUTOTUNE_TILES]


def _prune_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Triton's early_config_prune: drop the candidates that spill for float32 products."""
    float32 = kwargs.get("UPCAST") or torch.float32 in (named_args["x_ptr"].dtype, named_args["w_ptr"].dtype)
    keep = set(autotune_tiles(bool(float32)))
    return [cfg for cfg in configs
            if TileConfig(cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"],
                          cfg.num_warps, cfg.num_stages) in keep]


def _kernels():
    """The launchable kernel: the plain jitted one, or its autotuned wrapper when
    DELTAKERN_AUTOTUNE=1 (never under the interpreter, which has nothing to time)."""
    global _autotuned
    if not autotune_enabled() or triton.knobs.runtime.interpret:
        return _fused_score_kernel
    if _autotuned is None:
        _autotuned = triton.autotune(
            configs=_autotune_configs(), key=["K", "D", "C", "NORMALIZE", "UPCAST", "PRECISION"],
            prune_configs_by={"early_config_prune": _prune_configs},
        )(_fused_score_kernel)
    return _autotuned


# --------------------------------------------------------------------------------------------
# The operator
# --------------------------------------------------------------------------------------------


def _dot_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """Native half-precision products when both inputs share a half dtype, else float32."""
    return x.dtype if x.dtype == w.dtype and x.dtype != torch.float32 else torch.float32


def kernel_arguments(
    x: torch.Tensor, w: torch.Tensor, inv_temp: float, c: int, normalize: bool, allow_tf32: bool,
    w_neg: torch.Tensor | None = None, groups: int = 1,
) -> tuple[tuple, dict, torch.dtype]:
    """The kernel's positional arguments (outputs allocated), its compile-time arguments and the
    dtype of its products, exactly as a launch passes them. The compile-only check
    (:mod:`deltakern.ops.triton.compiled`) builds them from the same function, so what it
    compiles is what a launch compiles. ``w_neg`` (same dtype as ``w``) adds the NegLabel
    groups: ``groups`` consecutive blocks of ``M // groups`` rows."""
    n, d = x.shape
    k = w.shape[0]
    # Coalesced loads need unit stride along D; any row stride is fine without a copy.
    if d > 1 and x.stride(1) != 1:
        x = x.contiguous()
    if d > 1 and w.stride(1) != 1:
        w = w.contiguous()
    dot_dtype = _dot_dtype(x, w)
    precision = dot_precision(x.device, dot_dtype, allow_tf32)

    def inverse_norms(rows: torch.Tensor) -> torch.Tensor:
        if normalize:
            return torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32).reciprocal()
        return torch.ones((rows.shape[0],), dtype=torch.float32, device=rows.device)

    w_scale = inverse_norms(w)
    top_v = torch.empty((n, c), dtype=torch.float32, device=x.device)
    top_i = torch.empty((n, c), dtype=torch.int64, device=x.device)
    lse = torch.empty((n,), dtype=torch.float32, device=x.device)
    if w_neg is None:
        # Without negatives the kernel never reads these (HAS_NEG is a compile-time False).
        wn, wn_scale, group_size, groups = w, w_scale, 1, 0
        lse_neg = torch.empty((n, 0), dtype=torch.float32, device=x.device)
    else:
        wn = w_neg.contiguous() if d > 1 and w_neg.stride(1) != 1 else w_neg
        wn_scale, group_size = inverse_norms(wn), wn.shape[0] // groups
        lse_neg = torch.empty((n, groups), dtype=torch.float32, device=x.device)
    args = (
        x, w, w_scale, top_v, top_i, lse, wn, wn_scale, lse_neg, n, k, d, groups, group_size,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), wn.stride(0), wn.stride(1), inv_temp * _LOG2E,
    )
    meta = dict(
        C=c, C_PAD=triton.next_power_of_2(c), NORMALIZE=normalize,
        # The interpreter stores bfloat16 as raw uint16 and only converts it explicitly, so there
        # bfloat16 products go through float32 (exact: a bf16 x bf16 product fits in float32).
        UPCAST=x.dtype != w.dtype or (triton.knobs.runtime.interpret and torch.bfloat16 in (x.dtype, w.dtype)),
        PRECISION=precision, HAS_NEG=w_neg is not None,
    )
    return args, meta, dot_dtype


def _launcher(kernel):
    """``wrap_triton(kernel)``, through which torch.compile traces the launch; under the
    interpreter the kernel itself, since torch before 2.14 refuses to wrap an interpreted one
    ("wrap_triton only works on functions annotated with triton.jit") and nothing is compiled."""
    return kernel if triton.knobs.runtime.interpret else wrap_triton(kernel)


@triton_op(OP_NAME, mutates_args=())
def _fused_score_state_op(
    x: torch.Tensor, w: torch.Tensor, w_neg: torch.Tensor | None, inv_temp: float, c: int, groups: int,
    normalize: bool, allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args, meta, dot_dtype = kernel_arguments(x, w, inv_temp, c, normalize, allow_tf32, w_neg, groups)
    n = x.shape[0]
    kernel = _kernels()
    if kernel is _autotuned:
        grid = lambda opts: (triton.cdiv(n, opts["BLOCK_M"]),)  # noqa: E731
        _launcher(kernel)[grid](*args, **meta)
    else:
        cfg = select_config(x.device, dot_dtype, c, negatives=w_neg is not None)
        grid = (triton.cdiv(n, cfg.block_m),)
        _launcher(kernel)[grid](
            *args, **meta, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return args[3], args[4], args[5], args[8]


@_fused_score_state_op.register_fake
def _fused_score_state_fake(x, w, w_neg, inv_temp, c, groups, normalize, allow_tf32):
    n = x.shape[0]
    return (
        x.new_empty((n, c), dtype=torch.float32),
        x.new_empty((n, c), dtype=torch.int64),
        x.new_empty((n,), dtype=torch.float32),
        x.new_empty((n, groups if w_neg is not None else 0), dtype=torch.float32),
    )


def _check_operands(X: torch.Tensor, W: torch.Tensor, c: int, inv_temp: float, w_name: str = "W") -> None:
    """What the kernel needs of its operands (values are checked by :func:`deltakern.score`)."""
    for name, t in (("X", X), (w_name, W)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise InvalidArgument(f"{name} must be a 2-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise InvalidArgumentType(
                f"{name} must be float32, float16 or bfloat16 for the Triton kernel, got {t.dtype}"
            )
    if X.shape[1] != W.shape[1]:
        raise InvalidArgument(f"X and {w_name} must share the embedding dimension, got {X.shape[1]} and {W.shape[1]}")
    if X.device != W.device:
        raise InvalidArgument(f"X and {w_name} must be on the same device, got {X.device} and {W.device}")
    if w_name == "W" and (isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= min(MAX_C, W.shape[0])):
        raise InvalidArgument(f"c must be an integer in [1, min({MAX_C}, K={W.shape[0]})], got {c!r}")
    if not (isinstance(inv_temp, (int, float)) and math.isfinite(inv_temp) and 0 < inv_temp <= MAX_INV_TEMPERATURE):
        # Past MAX_INV_TEMPERATURE the base-2 logit scale (inv_temp · log2 e, a float32 argument)
        # overflows and every logit becomes inf.
        raise InvalidArgument(
            f"inv_temp must be finite, > 0 and at most {MAX_INV_TEMPERATURE:.3g}, got {inv_temp!r}", param="inv_temp"
        )
    if X.shape[1] == 0:
        raise InvalidArgument("X and W must have at least one column (D >= 1)", param="X")


def fused_score_state(
    X: torch.Tensor,
    W: torch.Tensor,
    *,
    inv_temp: float,
    c: int,
    normalize: bool,
    allow_tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row scoring state of ``X [N, D]`` against ``W [K, D]`` in one fused Triton pass.

    Returns ``(topk_values [N, c] float32, topk_indices [N, c] int64, lse_outside [N] float32)``:
    the c largest logits ``inv_temp · x̂·ŵ`` (cosines when ``normalize``, else dot products)
    sorted descending with ties to the lower class index, their class indices, and the
    log-sum-exp of every other logit (-inf when K == c). Inputs are float32, float16 or
    bfloat16 with any strides, on CUDA (or CPU under ``TRITON_INTERPRET=1``); products
    accumulate in float32. float32 inputs use 3xTF32 products (float32-level accuracy) unless
    ``allow_tf32`` asks for plain TF32. Values are assumed checked (finite, non-zero rows when
    normalising): :func:`deltakern.score` does that.
    """
    _check_operands(X, W, c, inv_temp)
    return torch.ops.deltakern.fused_score_state_triton(
        X, W, None, float(inv_temp), int(c), 1, bool(normalize), bool(allow_tf32)
    )[:3]


def fused_score_neg_state(
    X: torch.Tensor,
    W: torch.Tensor,
    W_neg: torch.Tensor,
    *,
    inv_temp: float,
    c: int,
    groups: int,
    normalize: bool,
    allow_tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fused_score_state` plus the NegLabel groups, in the same launch: the fourth output
    ``[N, groups]`` float32 holds the log-sum-exp of each row's logits against each of ``groups``
    consecutive blocks of ``M // groups`` rows of ``W_neg [M, D]`` (``W``'s dtype; ``groups``
    must divide M)."""
    _check_operands(X, W, c, inv_temp)
    _check_operands(X, W_neg, c, inv_temp, w_name="W_neg")
    if W_neg.dtype != W.dtype:
        raise InvalidArgumentType(f"W_neg must have W's dtype {W.dtype}, got {W_neg.dtype}", param="W_neg")
    m = W_neg.shape[0]
    if isinstance(groups, bool) or not isinstance(groups, int) or not (1 <= groups <= m and m % groups == 0):
        raise InvalidArgument(f"groups must divide the M={m} rows of W_neg into equal groups, got {groups!r}", param="groups")
    return torch.ops.deltakern.fused_score_state_triton(
        X, W, W_neg, float(inv_temp), int(c), int(groups), bool(normalize), bool(allow_tf32)
    )
