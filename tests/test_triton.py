"""The fused Triton scoring kernel on CPU through Triton's interpreter (TRITON_INTERPRET=1).

The interpreter runs the real kernel source block by block with numpy, so these tests check
the algorithm (tiling, masking, the online top-c merge, the outside log-sum-exp) against the
plain-PyTorch reference and the float64 oracle at small odd shapes. The interpreter tile
config (32x32x32) puts every shape below across several row, column and D tiles with partial
edges. GPU behaviour (tensor cores, TF32, large shapes) is covered by test_triton_gpu.py.

Triton decides at import time whether it interprets, and a normal test session imports it
compiled (or not at all). So a plain ``pytest`` run collects a single test here,
``test_interpreter_suite``, which runs this file again in a subprocess with
``TRITON_INTERPRET=1`` set before anything imports triton; that subprocess runs all the other
tests. ``TRITON_INTERPRET=1 pytest tests/test_triton.py`` runs them directly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from oracle import (  # noqa: E402
    assert_close_contract,
    assert_indices_match,
    confident_rows,
    logits64,
    neglabel64,
    scores64,
)

import deltakern as dk  # noqa: E402
from deltakern.ops.triton import interpreter_active  # noqa: E402
from deltakern.reference import scoring as reference  # noqa: E402

INTERPRETED = interpreter_active()  # this process imported triton in interpreter mode
SCORE_FIELDS = ("delta_energy", "delta_energy_terms", "energy", "max_logit", "msp", "topk_values")


@pytest.fixture(scope="module")
def fused():
    from deltakern.ops.triton import fused_score

    return fused_score


def make_inputs(n: int, k: int, d: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g) * (0.5 + torch.rand(n, 1, generator=g))
    W = torch.randn(k, d, generator=g) * (0.5 + torch.rand(k, 1, generator=g))
    return X.to(dtype), W.to(dtype)


def check_state(fused, X, W, *, temperature, c, normalize=True, dtype=torch.float32):
    """Kernel state against the reference state and the float64 logits."""
    got_v, got_i, got_lse = fused.fused_score_state(
        X, W, inv_temp=1.0 / temperature, c=c, normalize=normalize
    )
    want_v, want_i, want_lse = reference.score_state(X, W, temperature=temperature, c=c, normalize=normalize)
    assert got_v.shape == (X.shape[0], c) and got_i.shape == (X.shape[0], c) and got_lse.shape == (X.shape[0],)
    assert got_v.dtype == torch.float32 and got_i.dtype == torch.int64 and got_lse.dtype == torch.float32
    assert_close_contract(got_v, want_v, dtype, "topk_values vs reference")
    assert_indices_match(got_i, want_i, logits64(X, W, temperature, normalize), dtype)
    if W.shape[0] == c:
        assert bool(torch.isneginf(got_lse).all()), "lse_outside must be -inf when K == c"
    else:
        assert_close_contract(got_lse, want_lse, dtype, "lse_outside vs reference")


def check_scores(X, W, *, temperature, c, reset, dtype=torch.float32, normalize=True):
    """dk.score_modes(backend="triton") against the float64 oracle, both modes."""
    got = dk.score_modes(X, W, temperature=temperature, c=c, reset=reset, normalize=normalize, backend="triton")
    for mode, scores in got.items():
        want = scores64(X, W, temperature=temperature, c=c, reset=reset, mode=mode, normalize=normalize)
        for field in SCORE_FIELDS:
            assert_close_contract(getattr(scores, field), want[field], dtype, f"triton/{mode}/{field}")
        assert_indices_match(scores.topk_indices, want["topk_indices"], want["logits"], dtype)
        assert torch.equal(scores.pred, scores.topk_indices[:, 0])
    return got


# Covers N ∈ {1, 5, 130}, K ∈ {1, 3, 70, 257}, D ∈ {16, 48, 96}, c ∈ {1, 3, 16} pairwise.
STATE_CASES = [
    (1, 1, 16, 1),
    (5, 3, 48, 1),
    (5, 3, 16, 3),
    (130, 3, 96, 3),
    (1, 70, 48, 1),
    (130, 70, 96, 1),
    (130, 70, 48, 3),
    (5, 70, 16, 16),
    (130, 257, 16, 1),
    (5, 257, 48, 3),
    (1, 257, 96, 16),
    (130, 257, 96, 16),
]


@pytest.mark.parametrize("n,k,d,c", STATE_CASES)
def test_state_matches_reference(fused, n, k, d, c):
    X, W = make_inputs(n, k, d, seed=n * 1000 + k * 10 + d + c)
    check_state(fused, X, W, temperature=0.01, c=c)


# (n, k, d, c, temperature, reset, normalize)
SCORE_CASES = [
    (5, 3, 16, 1, 0.01, 0.0, True),
    (130, 70, 48, 3, 0.01, 0.1, True),
    (5, 257, 96, 16, 1.0, -0.3, True),
    (130, 257, 16, 1, 1.0, 0.2, True),
    (1, 70, 96, 3, 0.01, -0.5, True),
    (130, 70, 48, 3, 1.0, 0.5, False),
]


@pytest.mark.parametrize("n,k,d,c,temperature,reset,normalize", SCORE_CASES)
def test_scores_match_float64_oracle(n, k, d, c, temperature, reset, normalize):
    X, W = make_inputs(n, k, d, seed=7 * n + k + d)
    if not normalize:  # keep unnormalised logits in a sane range at τ = 1
        X, W = X / d**0.5, W / d**0.5
    check_scores(X, W, temperature=temperature, c=c, reset=reset, normalize=normalize)


@pytest.mark.parametrize("c", [1, 3])
def test_confident_rows(c):
    X, W = confident_rows(130, 70, 48, seed=c)
    want = scores64(X, W, temperature=0.01, c=1)
    assert bool((want["msp"] > 1 - 1e-12).all()), "the fixture must produce confident rows"
    check_scores(X, W, temperature=0.01, c=c, reset=0.0)
    check_scores(X, W, temperature=0.01, c=c, reset=-0.9)  # reset far below: outside LSE dominates


def test_far_outside_logits_keep_their_digits():
    """Outside logits ~200 below the top (τ = 0.01, opposite classes) must not underflow: with
    a reset of -1 the separate ΔE depends on them entirely."""
    g = torch.Generator().manual_seed(5)
    W = torch.randn(40, 16, generator=g)
    W = torch.cat([W, -W])  # each class has its antipode
    X = W[torch.tensor([0, 3, 41, 79])] + 1e-3 * torch.randn(4, 16, generator=g)
    check_scores(X, W, temperature=0.01, c=1, reset=-1.0)
    check_scores(X, W, temperature=0.01, c=3, reset=-1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(fused, dtype):
    X, W = make_inputs(130, 257, 48, seed=11, dtype=dtype)
    check_state(fused, X, W, temperature=0.01, c=3, dtype=dtype)
    check_scores(X, W, temperature=0.01, c=3, reset=0.1, dtype=dtype)


def test_mixed_input_dtypes():
    X, _ = make_inputs(5, 70, 48, seed=12, dtype=torch.bfloat16)
    _, W = make_inputs(5, 70, 48, seed=13, dtype=torch.float32)
    # float32 products of the exact bf16 values: held to the bf16 contract of the inputs
    check_scores(X, W, temperature=0.01, c=3, reset=0.0, dtype=torch.bfloat16)


def test_strided_inputs_are_read_without_changing_them():
    base, W = make_inputs(260, 70, 96, seed=21)
    base_copy, w_copy = base.clone(), W.clone()
    cases = [
        ("rows with a stride (read in place)", base[::2], W),
        ("columns with a stride (copied)", base[:130, ::2], W[:, :48]),
        ("column-major X", base[:130, :48].T.contiguous().T, W[:, :48]),
        ("column-major W", base[:130, :96], W.T.contiguous().T),
    ]
    for name, X, Wv in cases:
        got = dk.score(X, Wv, c=3, backend="triton")
        want = dk.score(X.contiguous(), Wv.contiguous(), c=3, backend="reference")
        for field in SCORE_FIELDS:
            assert_close_contract(getattr(got, field), getattr(want, field), torch.float32, f"{name}/{field}")
    assert torch.equal(base, base_copy) and torch.equal(W, w_copy)


@pytest.mark.parametrize("c", [1, 3, 16])
def test_exact_ties_go_to_the_lower_class_index(fused, c):
    """Integer embeddings give bit-identical logits for duplicated classes; duplicates sit in
    different column tiles, so the cross-tile merge must keep the earlier class first."""
    g = torch.Generator().manual_seed(c)
    W = torch.randint(-3, 4, (70, 16), generator=g).float()
    W[40] = W[5]
    W[65] = W[5]
    W[33] = W[2]
    X = torch.randint(-3, 4, (37, 16), generator=g).float()
    X[:8] = W[torch.tensor([5, 2, 40, 65, 33, 5, 2, 0])]
    got_v, got_i, got_lse = fused.fused_score_state(X, W, inv_temp=1.0, c=c, normalize=False)
    want = scores64(X, W, temperature=1.0, c=c, normalize=False)
    assert torch.equal(got_i, want["topk_indices"])
    assert_close_contract(got_v, want["topk_values"], torch.float32, "topk_values")
    want_lse = reference.score_state(X, W, temperature=1.0, c=c, normalize=False)[2]
    assert_close_contract(got_lse, want_lse, torch.float32, "lse_outside")


@pytest.mark.parametrize("c", [1, 16])
@pytest.mark.parametrize("negatives", [False, True])
def test_gpu_tile_shapes(fused, monkeypatch, c, negatives):
    """The Hopper block sizes for 16-bit inputs (BLOCK_K = 64 leaves a partial D tile at D = 96;
    256-wide class tiles at c = 1 without negatives), and the launch asks for the NegLabel
    variant's tiles exactly when it has negatives."""
    cfg = fused.tile_config((9, 0), torch.bfloat16, c, negatives)
    asked = []
    monkeypatch.setattr(fused, "select_config", lambda *args, **kwargs: asked.append(kwargs) or cfg)
    X, W = make_inputs(130, 257, 96, seed=31 + c)
    if negatives:
        N = make_inputs(40, 1, 96, seed=7)[0]
        *state, _ = fused.fused_score_neg_state(X, W, N, inv_temp=100.0, c=c, groups=2, normalize=True)
        assert all(torch.equal(a, b) for a, b in zip(state, fused.fused_score_state(X, W, inv_temp=100.0, c=c, normalize=True)))
    else:
        check_state(fused, X, W, temperature=0.01, c=c)
    assert asked and all(kwargs == {"negatives": negatives} for kwargs in asked[:1]), asked


def test_score_reduces_each_matrix_once_for_the_checks_and_the_scaling(fused, monkeypatch):
    """dk.score on the Triton path: the value check and the safe-range scaling share one
    largest-|value| pass over X and one over W (each made its own before)."""
    import deltakern.core.dtypes as dtypes_module
    import deltakern.core.validation as validation_module
    import deltakern.scoring as scoring_module

    real, reduced = dtypes_module.row_max_abs, []

    def counting(t):
        reduced.append(tuple(t.shape))
        return real(t)

    for module in (dtypes_module, validation_module, scoring_module):
        monkeypatch.setattr(module, "row_max_abs", counting)
    X, W = make_inputs(33, 20, 16, seed=3)
    X[5] *= 2.0**-90  # a row outside the kernel's safe range: the scaling copies X
    W[2] *= 2.0**70
    got = dk.score(X, W, c=2, backend="triton")
    assert reduced.count(tuple(X.shape)) == 1 and reduced.count(tuple(W.shape)) == 1, reduced
    monkeypatch.undo()
    want = dk.score(X, W, c=2, backend="reference")
    for field in SCORE_FIELDS:
        assert_close_contract(getattr(got, field), getattr(want, field), torch.float32, field)


def test_interpreted_launch_does_not_need_wrap_triton(fused, monkeypatch):
    """torch before 2.14 refuses to wrap an interpreted kernel ("wrap_triton only works on
    functions annotated with triton.jit"): under the interpreter the op launches it directly."""

    def refuse(kernel):
        raise RuntimeError("wrap_triton only works on functions annotated with triton.jit or triton.autotune")

    monkeypatch.setattr(fused, "wrap_triton", refuse)
    X, W = make_inputs(20, 9, 16, seed=5)
    check_state(fused, X, W, temperature=0.01, c=2)


def test_c_above_limit_warns_and_matches_reference():
    X, W = make_inputs(5, 70, 16, seed=41)
    with pytest.warns(UserWarning, match="limit of 16"):
        got = dk.score(X, W, c=17, backend="triton")
    want = dk.score(X, W, c=17, backend="reference")
    for field in SCORE_FIELDS:
        assert torch.equal(getattr(got, field), getattr(want, field)), field


def test_float64_inputs_stay_float64():
    X, W = make_inputs(5, 70, 16, seed=42, dtype=torch.float64)
    with pytest.warns(UserWarning, match="float64 inputs are scored by the reference"):
        got = dk.score(X, W, c=3, reset=0.1, backend="triton")
    want = scores64(X, W, c=3, reset=0.1)
    assert got.delta_energy.dtype == torch.float64
    torch.testing.assert_close(got.delta_energy, want["delta_energy"], rtol=1e-10, atol=1e-10)


def test_bad_arguments_name_themselves(fused):
    X, W = make_inputs(5, 70, 16, seed=43)
    with pytest.raises(TypeError, match="X must be float32, float16 or bfloat16.*float64"):
        fused.fused_score_state(X.double(), W, inv_temp=100.0, c=1, normalize=True)
    with pytest.raises(ValueError, match=r"c must be an integer in \[1, min\(16, K=70\)\], got 17"):
        fused.fused_score_state(X, W, inv_temp=100.0, c=17, normalize=True)
    with pytest.raises(ValueError, match="c must be .* got 0"):
        fused.fused_score_state(X, W, inv_temp=100.0, c=0, normalize=True)
    with pytest.raises(ValueError, match="embedding dimension, got 16 and 8"):
        fused.fused_score_state(X, W[:, :8], inv_temp=100.0, c=1, normalize=True)
    with pytest.raises(ValueError, match="inv_temp must be finite, > 0 and at most .*, got -1"):
        fused.fused_score_state(X, W, inv_temp=-1.0, c=1, normalize=True)
    # 1/τ whose base-2 form (times log2 e) overflows float32 would make every logit inf.
    with pytest.raises(ValueError, match="inv_temp must be finite, > 0 and at most 1.7e\\+38, got 1e\\+300"):
        fused.fused_score_state(X, W, inv_temp=1e300, c=1, normalize=True)
    with pytest.raises(ValueError, match="at least one column"):
        fused.fused_score_state(X[:, :0], W[:, :0], inv_temp=100.0, c=1, normalize=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemm_control_writes_the_logits(dtype):
    """The plain Triton GEMM the fused kernel is compiled and benchmarked against (same tiles)
    computes X @ Wᵀ, partial edges included."""
    from deltakern.ops.triton import gemm

    X, W = make_inputs(70, 45, 40, seed=3, dtype=dtype)
    got = gemm.logits(X, W, c=3)
    assert got.dtype == dtype and got.shape == (70, 45)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.double(), X.double() @ W.double().T, rtol=tol, atol=tol * 10)


def test_fake_kernel_and_schema(fused):
    """opcheck of the registered op: schema, fake (meta) kernel vs the real one, autograd
    registration. The AOT-dispatch check traces the kernel launch, which needs compiled Triton:
    test_triton_gpu.py runs the full opcheck."""
    X, W = make_inputs(5, 70, 16, seed=44)
    op = torch.ops.deltakern.fused_score_state_triton.default
    for c, negatives, groups in ((1, None, 1), (3, None, 1), (3, W[:30].flip(0), 3)):
        torch.library.opcheck(
            op, (X, W, negatives, 100.0, c, groups, True, False),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
        )
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fx, fw = torch.empty(1000, 512, dtype=torch.bfloat16), torch.empty(77, 512, dtype=torch.bfloat16)
        v, i, lse, lse_neg = op(fx, fw, None, 100.0, 5, 1, True, False)
        assert v.shape == (1000, 5) and v.dtype == torch.float32
        assert i.shape == (1000, 5) and i.dtype == torch.int64
        assert lse.shape == (1000,) and lse.dtype == torch.float32
        assert lse_neg.shape == (1000, 0)
        *_, lse_neg = op(fx, fw, fw[:70], 100.0, 5, 7, True, False)
        assert lse_neg.shape == (1000, 7) and lse_neg.dtype == torch.float32


# (n, k, m, d, c, groups, normalize): group sizes that are not multiples of the 32-wide column
# tiles, groups smaller than one tile, several row and D tiles with partial edges.
NEG_CASES = [
    (1, 1, 1, 16, 1, 1, True),
    (45, 37, 70, 40, 3, 5, True),
    (130, 70, 99, 48, 1, 3, True),
    (5, 3, 64, 96, 2, 1, False),
]


@pytest.mark.parametrize("n,k,m,d,c,groups,normalize", NEG_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_negative_groups_state(fused, n, k, m, d, c, groups, normalize, dtype):
    """The NegLabel groups in the same launch: each group's log-sum-exp against float64, and the
    ID outputs equal to the launch without negatives, bit for bit."""
    X, W = make_inputs(n, k, d, seed=n + m + d, dtype=dtype)
    N = make_inputs(m, 1, d, seed=m * 3 + d, dtype=dtype)[0]
    temperature = 0.01 if normalize else 1.0
    if not normalize:
        X, W, N = X / d**0.5, W / d**0.5, N / d**0.5
    *id_state, lse_neg = fused.fused_score_neg_state(
        X, W, N, inv_temp=1.0 / temperature, c=c, groups=groups, normalize=normalize
    )
    plain = fused.fused_score_state(X, W, inv_temp=1.0 / temperature, c=c, normalize=normalize)
    for got, want in zip(id_state, plain):
        assert torch.equal(got, want)
    assert lse_neg.shape == (n, groups) and lse_neg.dtype == torch.float32
    want = torch.logsumexp(logits64(X, N, temperature, normalize).view(n, groups, -1), dim=2)
    assert_close_contract(lse_neg, want, dtype, "lse_neg vs float64")


@pytest.mark.parametrize("case", ["random", "confident", "negatives_dominate"])
def test_neglabel_scores_match_float64(case):
    """dk.score(backend="triton", negatives=...) against the float64 NegLabel definition."""
    X, W = make_inputs(37, 11, 33, seed=9)
    N = make_inputs(41, 1, 33, seed=10)[0]
    if case == "confident":
        X = W[torch.arange(37) % 11] + 0.01 * X
    if case == "negatives_dominate":
        X = N[torch.arange(37) % 41] + 0.01 * X
    for groups in (1, 4):
        got = dk.score(X, W, c=2, negatives=N, negative_groups=groups, backend="triton")
        want = dk.score(X, W, c=2, backend="triton")
        for field in SCORE_FIELDS:
            assert torch.equal(getattr(got, field), getattr(want, field)), field
        assert_close_contract(got.neglabel, neglabel64(X, W, N, temperature=0.01, groups=groups), torch.float32, case)


def test_negative_arguments_name_themselves(fused):
    X, W = make_inputs(5, 7, 16, seed=45)
    with pytest.raises(TypeError, match="W_neg must have W's dtype torch.float32, got torch.float16"):
        fused.fused_score_neg_state(X, W, W.half(), inv_temp=100.0, c=1, groups=1, normalize=True)
    with pytest.raises(ValueError, match="groups must divide the M=7 rows of W_neg into equal groups, got 2"):
        fused.fused_score_neg_state(X, W, W, inv_temp=100.0, c=1, groups=2, normalize=True)
    with pytest.raises(ValueError, match="X and W_neg must share the embedding dimension"):
        fused.fused_score_neg_state(X, W, W[:, :8], inv_temp=100.0, c=1, groups=1, normalize=True)


def test_backend_choice():
    assert "triton" in dk.available_backends("cpu")  # the interpreter makes it usable on CPU
    assert dk.scoring.resolve_backend("auto", "cpu") != "triton"  # never chosen automatically
    assert dk.scoring.resolve_backend("triton", "cpu", 16) == "triton"


# ---- run in the parent (non-interpreted) process only ---------------------------------------


def test_interpreter_suite():
    """Run every kernel test of this file under the interpreter in a fresh process."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestAssertRewriteWarning"],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=900,
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"interpreter tests failed (exit {proc.returncode}):\n{report[-12000:]}"
    assert " passed" in report and "skipped" not in report, report[-4000:]
    print(report.strip().splitlines()[-1])


def test_late_interpreter_setting_is_reported(monkeypatch):
    """TRITON_INTERPRET=1 set after triton was imported compiled cannot take effect; the
    backend says so instead of failing inside the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reason = dk.scoring.backend_status("cpu")["triton"]
    assert reason is not None and "before importing triton" in reason
    with pytest.raises(ValueError, match="before importing triton"):
        dk.score(torch.ones(2, 4), torch.ones(3, 4), backend="triton")


# A test runs in exactly one of the two processes.
_PARENT_ONLY = {"test_interpreter_suite", "test_late_interpreter_setting_is_reported"}
for _name in [name for name in globals() if name.startswith("test_")]:
    if (_name in _PARENT_ONLY) == INTERPRETED:
        del globals()[_name]
