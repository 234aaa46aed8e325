"""The Triton kernels compiled for sm_90 and sm_80 without a GPU: what a GPU run depends on.

``triton.compile`` runs Triton's whole pipeline down to ptxas (bundled with Triton) on the CPU.
For the fused scoring kernel at the tile configs ``tile_config`` picks, compiled with the
specialization a real launch gets (deltakern.ops.triton.compiled), these tests assert:

- operand tiles multi-buffered (≥ 2 copies in shared memory), like the plain Triton GEMM of the
  same tiles compiled beside it as the control;
- the tile product in a single loop (the pipeline does not refill at every class tile);
- tensor-core instructions (HGMMA / ``wgmma`` on sm_90, HMMA / ``mma.sync`` on sm_80);
- no register spills (ptxas ``-v``, and no local-memory instructions in the SASS);
- shared memory within the target's per-block limit.

A compile takes 1–10 s on a 2-core machine, so the default run compiles a representative
subset (each target with every dtype and every c at least once: 6 fused kernels and their 6
controls; 32 s on an idle 2-core AMD EPYC); ``-m slow`` adds the full matrix (2 targets ×
3 dtypes × c ∈ {1, 3, 16}; the whole file takes 2 min 12 s there, 4-6 min when the machine is
shared) and
the odd-D launch and the autotuning candidates. Every test prints the fused kernel's numbers
beside the control's. (CI's plain ``pytest -q`` runs both.)
"""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("triton")

from deltakern.ops.triton import interpreter_active  # noqa: E402

pytestmark = pytest.mark.skipif(interpreter_active(), reason="compiles for GPU targets (TRITON_INTERPRET is set)")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TARGETS = (90, 80)
# Every dtype and every c once per target; the pairing differs between targets.
SUBSET = [(90, "bfloat16", 1), (90, "float32", 16), (90, "float16", 3),
          (80, "float32", 1), (80, "bfloat16", 16), (80, "float16", 3)]
FULL = [(t, d, c) for t in TARGETS for d in DTYPES for c in (1, 3, 16) if (t, d, c) not in SUBSET]


@pytest.fixture(scope="module")
def compiled():
    from deltakern.ops.triton import compiled as module

    return module


@functools.lru_cache(maxsize=None)
def _gemm(target: int, dtype: str, config, d: int):
    from deltakern.ops.triton import compiled as module

    return module.gemm_report(target, DTYPES[dtype], 1, config=config, d=d)


def _pair(target: int, dtype: str, c: int, d: int = 512):
    """The fused kernel and its control; the control depends only on the tiles, so c values
    sharing a config share one compile."""
    from deltakern.ops.triton import compiled as module
    from deltakern.ops.triton import fused_score

    config = fused_score.tile_config((target // 10, target % 10), DTYPES[dtype], c)
    return module.fused_report(target, DTYPES[dtype], c, d=d), _gemm(target, dtype, config, d)


def _check_pair(compiled, capsys, target, dtype, c, d=512):
    fused, control = _pair(target, dtype, c, d)
    with capsys.disabled():
        print("\n" + compiled.format_table([(fused, control)]))
    # The control must be pipelined, or the check compiles something a launch would not.
    assert control.operand_buffers >= 2, f"control GEMM single-buffered: {control}"
    assert compiled.problems_of(fused) == [], f"sm_{target} {dtype} c={c}: {compiled.problems_of(fused)}"
    assert fused.operand_buffers >= 2 and fused.tensor_core_instructions > 0


@pytest.mark.parametrize("target,dtype,c", SUBSET)
def test_fused_kernel_compiles_pipelined_on_tensor_cores_without_spills(compiled, capsys, target, dtype, c):
    _check_pair(compiled, capsys, target, dtype, c)


@pytest.mark.slow
@pytest.mark.parametrize("target,dtype,c", FULL)
def test_full_matrix(compiled, capsys, target, dtype, c):
    _check_pair(compiled, capsys, target, dtype, c)


@pytest.mark.parametrize("target,dtype,c", [(90, "bfloat16", 1), (80, "float32", 3)])
def test_negative_label_variant_compiles_pipelined_without_spills(compiled, capsys, target, dtype, c):
    """The NegLabel launch (a second flat loop over the negative groups after the ID classes):
    both tile products pipelined, on tensor cores, without spills."""
    from deltakern.ops.triton import fused_score

    config = fused_score.tile_config((target // 10, target % 10), DTYPES[dtype], c, negatives=True)
    fused = compiled.fused_report(target, DTYPES[dtype], c, negatives=10_000, groups=4)
    control = _gemm(target, dtype, config, 512)
    with capsys.disabled():
        print("\n" + compiled.format_table([(fused, control)]))
    assert compiled.problems_of(fused) == [], f"sm_{target} {dtype} c={c}: {compiled.problems_of(fused)}"
    assert fused.operand_buffers >= 2 and fused.tensor_core_instructions > 0


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_odd_embedding_width_still_compiles_without_spills(compiled, capsys, target):
    """D = 500 (not a multiple of 16): loads cannot be vectorised, so the operands may stay
    single-buffered (docs/architecture.md §4), but the kernel must still use tensor cores, fit
    shared memory and not spill."""
    fused, control = _pair(target, "bfloat16", 16, d=500)
    with capsys.disabled():
        print("\n" + compiled.format_table([(fused, control)]))
    problems = [p for p in compiled.problems_of(fused) if "single-buffered" not in p]
    assert problems == []


def _autotune_cases():
    from deltakern.ops.triton import fused_score

    return [(dtype, tile) for dtype in ("bfloat16", "float32")
            for tile in fused_score.autotune_tiles(dtype == "float32")]


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tile", _autotune_cases(), ids=lambda v: str(v) if isinstance(v, str) else
                         f"{v.block_m}x{v.block_n}x{v.block_k}w{v.num_warps}s{v.num_stages}")
def test_autotune_candidates_do_not_spill(compiled, capsys, dtype, tile):
    """DELTAKERN_AUTOTUNE=1 times only candidates that compile without spills for the dtype's
    products (sm_90, c = 16: the most epilogue state)."""
    fused = compiled.fused_report(90, DTYPES[dtype], 16, config=tile)
    with capsys.disabled():
        print(f"\nautotune {dtype} {fused.tiles}: {fused.registers} registers, {fused.spill_stores} B spilled, "
              f"{fused.shared_bytes // 1024} KB, {fused.operand_buffers} operand buffers")
    assert compiled.problems_of(fused) == []


def test_launch_specialization_matches_triton(compiled):
    """The check compiles what a launch compiles: pointers and multiples of 16 carry the
    divisibility attribute, a unit stride becomes the constant 1, other integers stay plain."""
    from deltakern.ops.triton import fused_score

    X, W = torch.empty(1001, 512, dtype=torch.bfloat16), torch.empty(1000, 512, dtype=torch.bfloat16)
    args, meta, _ = fused_score.kernel_arguments(X, W, 100.0, 3, True, False)
    meta = dict(meta, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64)
    signature, constexprs, attrs = compiled.specialize(fused_score._fused_score_kernel, args, meta)
    names = fused_score._fused_score_kernel.arg_names
    divisible = {names[i] for (i,), a in attrs.items() if ["tt.divisibility", 16] in a}
    assert {"x_ptr", "w_ptr", "D", "stride_xn", "stride_wk"} <= divisible
    assert not {"N", "K"} & divisible
    assert constexprs["stride_xd"] == 1 and constexprs["stride_wd"] == 1 and constexprs["C"] == 3
    assert signature["x_ptr"] == "*bf16" and signature["logit_scale"] == "fp32"


def test_tile_configs_match_select_config():
    """tile_config is what a launch picks on a GPU of that generation."""
    from deltakern.ops.triton import fused_score

    for dt in DTYPES.values():
        for c in (1, 3, 16):
            assert fused_score.select_config(torch.device("cpu"), dt, c) == fused_score.TileConfig(32, 32, 32, 1, 1)
            for cap in ((9, 0), (8, 0), (8, 6)):
                cfg = fused_score.tile_config(cap, dt, c)
                assert cfg.num_stages >= 2 and cfg.block_k in (32, 64)


def test_autotune_prunes_the_float32_candidates_that_spill():
    from deltakern.ops.triton import fused_score

    configs = fused_score._autotune_configs()
    bf16, f32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1)
    kept = fused_score._prune_configs(configs, {"x_ptr": bf16, "w_ptr": bf16}, UPCAST=False, C=16)
    assert len(kept) == len(configs) == len(fused_score.AUTOTUNE_TILES)
    for args, upcast in (((f32, f32), False), ((bf16, f32), True)):
        kept = fused_score._prune_configs(configs, {"x_ptr": args[0], "w_ptr": args[1]}, UPCAST=upcast, C=16)
        assert 1 <= len(kept) < len(configs)
        assert all(cfg.kwargs["BLOCK_K"] == 32 and cfg.num_warps == 8 for cfg in kept)
