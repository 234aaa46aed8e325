"""Every CPU backend against the float64 oracle of docs/conventions.md §2 on odd shapes."""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from oracle import assert_close_contract, assert_indices_match, confident_rows, scores64

import deltakern as dk
from deltakern.core.constants import MODES
from deltakern.ops.triton import interpreter_active
from deltakern.reference import scoring as reference

CPU_BACKENDS = [b for b in ("reference", "cpp") if b in dk.available_backends("cpu")]
# Under TRITON_INTERPRET=1 (the subprocess of test_triton_interpreted) the Triton kernel runs on
# CPU tensors too; the tests that take ALL_BACKENDS then cover it.
INTERPRETED = importlib.util.find_spec("triton") is not None and interpreter_active()
ALL_BACKENDS = CPU_BACKENDS + (["triton"] if "triton" in dk.available_backends("cpu") else [])
SCORE_FIELDS = ("delta_energy", "delta_energy_terms", "energy", "max_logit", "msp", "topk_values")
# (temperature, reset) settings cycled over the shapes so each shape meets one of them
SETTINGS = [(0.01, 0.0), (1.0, 0.1), (0.01, -0.2)]
SHAPES = [
    (n, k, d)
    for (n, k), d in itertools.product(itertools.product((1, 7, 257, 4099), (1, 2, 3, 1001)), (3, 65, 512))
    if not (n == 4099 and k == 1001 and d == 512)  # the largest case adds time, not coverage
]


def make_inputs(n: int, k: int, d: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g) * (0.5 + torch.rand(n, 1, generator=g))
    W = torch.randn(k, d, generator=g)
    return X.to(dtype), W.to(dtype)


def check_against_oracle(X, W, c, temperature, reset, backend, dtype):
    got = dk.score_modes(X, W, temperature=temperature, c=c, reset=reset, backend=backend)
    for mode, scores in got.items():
        want = scores64(X, W, temperature=temperature, c=c, reset=reset, mode=mode)
        for field in SCORE_FIELDS:
            assert_close_contract(getattr(scores, field), want[field], dtype, f"{backend}/{mode}/{field}")
        assert_indices_match(scores.topk_indices, want["topk_indices"], want["logits"], dtype)
        assert scores.pred.dtype == torch.int64 and scores.topk_indices.dtype == torch.int64
        assert scores.delta_energy.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n,k,d", SHAPES)
def test_backends_match_float64_oracle(backend, n, k, d):
    temperature, reset = SETTINGS[(n + k + d) % len(SETTINGS)]
    X, W = make_inputs(n, k, d, seed=n * 31 + k * 7 + d)
    for c in (1, 2, 5):
        if c <= k:
            check_against_oracle(X, W, c, temperature, reset, backend, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes(backend, dtype):
    X, W = make_inputs(257, 1001, 65, seed=3, dtype=dtype)
    for c in (1, 5):
        check_against_oracle(X, W, c, 0.01, 0.05, backend, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_confident_rows_keep_every_digit(backend):
    # Top-1 probability > 1 - 1e-12: subtracting exp(top) from the full sum would lose all digits.
    X, W = confident_rows(64, 1001, 512, seed=1)
    want = scores64(X, W, temperature=0.01, c=2)
    assert bool((want["msp"] > 1 - 1e-12).all()), "the fixture must produce confident rows"
    for mode in ("separate", "joint"):
        got = dk.score(X, W, temperature=0.01, c=2, mode=mode, backend=backend)
        want = scores64(X, W, temperature=0.01, c=2, mode=mode)
        for field in SCORE_FIELDS:
            assert_close_contract(getattr(got, field), want[field], torch.float32, f"{mode}/{field}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ties_go_to_lower_class_index(backend):
    # Small integers make every dot product exact whatever the matmul's summation order, so
    # duplicated class rows give bit-identical logits and tie-breaking is tested exactly.
    g = torch.Generator().manual_seed(0)
    X = torch.randint(-3, 4, (9, 16), generator=g).float()
    base = torch.randint(-3, 4, (4, 16), generator=g).float()
    W = torch.cat([base, base[[1, 0]], base])
    got = dk.score(X, W, c=4, normalize=False, temperature=1.0, backend=backend)
    want = scores64(X, W, c=4, normalize=False, temperature=1.0)
    assert torch.equal(got.topk_indices, want["topk_indices"])
    assert torch.equal(got.topk_values.double(), want["topk_values"])


def tied_rising_rows(n: int = 23, k: int = 333, d: int = 16, seed: int = 4):
    """``(X, W)`` whose logits (normalize=False, τ = 1) are exact small integers that rise block
    by block along the classes, with many exact ties in every block: the C++ epilogue fills its
    top-c list in the first block of 64 and later blocks then hold ties above its c-th value."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(1, 4, (n, d), generator=g).float()  # positive row sums
    block = torch.arange(k) // 64
    block[(k // 64) * 64:] = 0  # the ragged tail (offered one by one) stays low
    levels = torch.randint(0, 4, (k,), generator=g) + 2 * block
    W = levels.float().unsqueeze(1) * torch.ones(1, d)  # logit = level · sum(x): ties by level
    return X, W


@pytest.mark.parametrize("c", [1, 4])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ties_above_the_running_threshold_go_to_lower_class_index(backend, c):
    X, W = tied_rising_rows()
    got = dk.score(X, W, c=c, normalize=False, temperature=1.0, backend=backend)
    want = scores64(X, W, c=c, normalize=False, temperature=1.0)
    assert torch.equal(got.topk_indices, want["topk_indices"])
    assert torch.equal(got.topk_values.double(), want["topk_values"])
    for field in SCORE_FIELDS:
        assert_close_contract(getattr(got, field), want[field], torch.float32, field)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unnormalized_logits(backend):
    X, W = make_inputs(33, 17, 9, seed=5)
    got = dk.score(X, W, normalize=False, temperature=2.0, c=3, backend=backend)
    want = scores64(X, W, normalize=False, temperature=2.0, c=3)
    for field in SCORE_FIELDS:
        assert_close_contract(getattr(got, field), want[field], torch.float32, field)


def test_backends_agree_with_each_other_and_c_equals_k():
    X, W = make_inputs(130, 6, 33, seed=11)
    results = [dk.score(X, W, c=6, mode="joint", backend=b) for b in CPU_BACKENDS]
    for r in results[1:]:
        torch.testing.assert_close(r.delta_energy, results[0].delta_energy, rtol=1e-5, atol=1e-5)
        assert torch.equal(r.topk_indices, results[0].topk_indices)
    # c == K in joint mode resets every logit: LSE becomes log(K) + r/τ.
    expected = results[0].energy.double() - torch.log(torch.tensor(6.0, dtype=torch.float64))
    torch.testing.assert_close(results[0].delta_energy.double(), expected, rtol=1e-5, atol=1e-4)


def test_c_equal_one_modes_agree():
    X, W = make_inputs(50, 40, 24, seed=2)
    sep = dk.score(X, W, c=1, mode="separate")
    joint = dk.score(X, W, c=1, mode="joint")
    torch.testing.assert_close(sep.delta_energy, joint.delta_energy)


# Non-default settings, so that a wrapper that drops or alters a keyword is caught.
WRAPPER_KWARGS = [
    {},
    {"temperature": 0.05, "c": 3, "reset": 0.1, "mode": "joint"},
    {"temperature": 0.02, "c": 2, "reset": -0.3, "mode": "separate", "normalize": False},
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kwargs", WRAPPER_KWARGS, ids=["defaults", "joint", "separate-unnormalised"])
def test_convenience_functions_match_the_float64_oracle(backend, kwargs):
    X, W = make_inputs(50, 40, 24, seed=2)
    want = scores64(X, W, **kwargs)
    for fn, field in ((dk.delta_energy, "delta_energy"), (dk.energy, "energy"),
                      (dk.max_logit, "max_logit"), (dk.msp, "msp")):
        assert_close_contract(fn(X, W, backend=backend, **kwargs), want[field], torch.float32, fn.__name__)
    # MCM: MSP of the cosines at its own temperature (default T = 1), same other keywords.
    mcm_kwargs = {k: v for k, v in kwargs.items() if k != "temperature"}
    assert_close_contract(dk.mcm(X, W, backend=backend, **mcm_kwargs),
                          scores64(X, W, temperature=1.0, **mcm_kwargs)["msp"], torch.float32, "mcm")
    assert_close_contract(dk.mcm(X, W, temperature=0.5, backend=backend, **mcm_kwargs),
                          scores64(X, W, temperature=0.5, **mcm_kwargs)["msp"], torch.float32, "mcm T=0.5")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_terms_give_every_smaller_c(backend):
    # docs/conventions.md §2.2: separate mode, ΔEnergy at c' is the sum of the first c' columns;
    # joint mode, column c' is ΔEnergy at c'. Checked against the float64 oracle at each c'.
    X, W = make_inputs(40, 30, 16, seed=9)
    kwargs = dict(temperature=0.03, reset=0.05, backend=backend)
    sep = dk.score(X, W, c=5, mode="separate", **kwargs).delta_energy_terms.double()
    joint = dk.score(X, W, c=5, mode="joint", **kwargs).delta_energy_terms
    for c in range(1, 6):
        want_sep = scores64(X, W, c=c, mode="separate", temperature=0.03, reset=0.05)
        want_joint = scores64(X, W, c=c, mode="joint", temperature=0.03, reset=0.05)
        assert_close_contract(sep[:, c - 1], want_sep["delta_energy_terms"][:, c - 1], torch.float32, f"term {c}")
        assert_close_contract(sep[:, :c].sum(1), want_sep["delta_energy"], torch.float32, f"separate c'={c}")
        assert_close_contract(joint[:, c - 1], want_joint["delta_energy"], torch.float32, f"joint c'={c}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_score_modes_returns_the_modes_asked_for(backend):
    X, W = make_inputs(33, 12, 20, seed=8)
    kwargs = dict(temperature=0.05, c=3, reset=0.2)
    for modes in (("joint",), ("separate",), ("joint", "separate")):
        got = dk.score_modes(X, W, modes=modes, backend=backend, **kwargs)
        assert tuple(got) == modes
        for mode, scores in got.items():
            want = scores64(X, W, mode=mode, **kwargs)
            for field in SCORE_FIELDS:
                assert_close_contract(getattr(scores, field), want[field], torch.float32, f"{modes}/{mode}/{field}")
    for bad in ("joint", (), ("joint", "both")):
        with pytest.raises(ValueError, match="mode"):
            dk.score_modes(X, W, modes=bad, backend=backend)


def _grad_inputs(seed=12, n=7, k=6, d=20):
    X, W = make_inputs(n, k, d, seed=seed)
    return X.requires_grad_(), W.requires_grad_()


SCORE_FUNCTIONS = {
    "score": lambda X, W, **kw: dk.score(X, W, **kw).as_dict(),
    "score_modes": lambda X, W, **kw: {
        f"{m}.{f}": v for m, s in dk.score_modes(X, W, modes=("joint", "separate"), **kw).items()
        for f, v in s.as_dict().items()
    },
    "delta_energy": lambda X, W, **kw: {"delta_energy": dk.delta_energy(X, W, **kw)},
    "energy": lambda X, W, **kw: {"energy": dk.energy(X, W, **kw)},
    "max_logit": lambda X, W, **kw: {"max_logit": dk.max_logit(X, W, **kw)},
    "msp": lambda X, W, **kw: {"msp": dk.msp(X, W, **kw)},
    "mcm": lambda X, W, **kw: {"mcm": dk.mcm(X, W, **kw)},
}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("name", list(SCORE_FUNCTIONS))
def test_scores_are_inference_only(backend, name):
    # docs/conventions.md §8.3: inputs that require grad are scored like any others and the
    # outputs carry no graph, on every backend (the C++ op used to fail inside torch.mm and
    # the reference returned differentiable outputs).
    fn = SCORE_FUNCTIONS[name]
    X, W = _grad_inputs()
    with torch.enable_grad():
        got = fn(X, W, c=2, backend=backend)
    want = fn(X.detach(), W.detach(), c=2, backend=backend)
    assert set(got) == set(want)
    for field, value in got.items():
        assert not value.requires_grad and value.grad_fn is None, f"{name}.{field} carries a graph"
        assert torch.equal(value, want[field]), f"{name}.{field} differs from the no-grad call"
    assert X.grad is None and W.grad is None and X.requires_grad and W.requires_grad
    # A leaf W seen through a view (W straight from a module's parameter) works too.
    linear = torch.nn.Linear(20, 6, bias=False)
    with torch.enable_grad():
        out = fn(X, linear.weight, backend=backend)
    assert all(v.grad_fn is None for v in out.values())


# Largest |value| of a row: 1e-21 already lost digits in a float32 sum of squares, 1e-23 and
# below underflowed to a "zero-norm" row; subnormal rows keep only a few bits but are still
# non-zero. 1e30 overflowed the sum of squares.
TINY_SCALES = [1e-21, 1e-23, 1e-30, 1e30]


def _tiny_rows(scale, seed=5, n=9, k=7, d=24, dtype=torch.float32):
    X, W = make_inputs(n, k, d, seed=seed, dtype=dtype)
    X[::2] *= scale  # every other row tiny (or huge), the rest ordinary
    W[1::3] *= scale
    assert bool((X[::2] != 0).any(dim=1).all()) and bool((W[1::3] != 0).any(dim=1).all())
    return X, W


def _subnormal_rows(dtype=torch.float32):
    X, W = make_inputs(9, 7, 24, seed=6)
    tiny = torch.finfo(dtype).tiny  # smallest normal: everything below it is subnormal
    X, W = X.to(dtype).clone(), W.to(dtype).clone()
    X[0] = (X[0] * tiny / 8).to(dtype)  # all entries subnormal
    X[1] = 0.0
    X[1, 3] = tiny / 4  # one subnormal entry, the rest zero: not a zero row
    X[2, ::2] = (X[2, ::2] * tiny * 1e-2).to(dtype)  # normal and subnormal entries mixed
    W[2] = (W[2] * tiny / 16).to(dtype)
    return X, W


def _check_tiny(X, W, backend, dtype, c=2):
    for mode in ("separate", "joint"):
        got = dk.score(X, W, c=c, mode=mode, temperature=0.01, reset=0.05, backend=backend)
        want = scores64(X, W, c=c, mode=mode, temperature=0.01, reset=0.05)
        for field in SCORE_FIELDS:
            assert_close_contract(getattr(got, field), want[field], dtype, f"{backend}/{mode}/{field}")
        assert_indices_match(got.topk_indices, want["topk_indices"], want["logits"], dtype)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("scale", TINY_SCALES)
def test_tiny_and_huge_rows_are_normalised_within_the_contract(backend, scale):
    X, W = _tiny_rows(scale)
    X_before, W_before = X.clone(), W.clone()
    _check_tiny(X, W, backend, torch.float32)
    assert torch.equal(X, X_before) and torch.equal(W, W_before), "rescaling wrote into the inputs"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_subnormal_rows_are_not_zero_rows(backend):
    X, W = _subnormal_rows()
    _check_tiny(X, W, backend, torch.float32)
    # Only an all-zero row is a zero-norm row.
    X[4] = 0.0
    with pytest.raises(ValueError, match="zero-norm row \\(row 4\\)"):
        dk.score(X, W, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype,scale", [(torch.bfloat16, 1e-30), (torch.bfloat16, 1e30), (torch.float16, 1e-6),
                                         (torch.float64, 1e-200), (torch.float64, 1e-310), (torch.float64, 1e200)])
def test_tiny_rows_in_other_dtypes(backend, dtype, scale):
    X, W = _tiny_rows(scale, dtype=dtype)
    _check_tiny(X, W, backend, dtype)


@pytest.mark.parametrize("scale", [1e-23, 1e-40, 1e30])
def test_reference_state_normalises_tiny_rows_itself(scale):
    # The reference is also called directly (the oracle of the kernels, the EBM loss's fallback):
    # its own normalisation must not underflow either.
    X, W = _tiny_rows(scale)
    top_v, top_i, outside = reference.score_state(X, W, temperature=0.01, c=2, normalize=True)
    want = scores64(X, W, temperature=0.01, c=2)
    assert_close_contract(top_v, want["topk_values"], torch.float32, "topk_values")
    assert torch.equal(top_i, want["topk_indices"])


def test_tiny_rows_without_normalisation_are_plain_dot_products():
    X, W = _tiny_rows(1e-23)
    got = dk.score(X, W, normalize=False, temperature=1.0)
    want = scores64(X, W, normalize=False, temperature=1.0)
    assert_close_contract(got.energy, want["energy"], torch.float32, "energy")


@pytest.mark.skipif(INTERPRETED or importlib.util.find_spec("triton") is None, reason="needs triton; runs in the parent")
def test_triton_interpreted():
    """The inference-only and tiny-row tests above, for the Triton kernel under its CPU
    interpreter (in a fresh process: triton fixes the mode when it is imported)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "triton and not interpreted",
         "-W", "ignore::pytest.PytestAssertRewriteWarning"],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=900,
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"interpreted Triton tests failed (exit {proc.returncode}):\n{report[-12000:]}"
    assert " passed" in report and " skipped" not in report, report[-4000:]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inputs_are_not_modified_and_strided_inputs_work(backend):
    X, W = make_inputs(64, 20, 48, seed=4)
    X_strided = torch.randn(48, 64).T  # non-contiguous view
    X_before, W_before, Xs_before = X.clone(), W.clone(), X_strided.clone()
    dk.score(X, W, c=3, backend=backend)
    got = dk.score(X_strided, W, c=3, backend=backend)
    assert torch.equal(X, X_before) and torch.equal(W, W_before) and torch.equal(X_strided, Xs_before)
    want = scores64(X_strided, W, c=3)
    assert_close_contract(got.delta_energy, want["delta_energy"], torch.float32, "strided")


def test_reference_chunking_does_not_change_results():
    X, W = make_inputs(100, 37, 10, seed=6)
    whole = reference.score_state(X, W, temperature=0.01, c=3, normalize=True)
    chunked = reference.score_state(X, W, temperature=0.01, c=3, normalize=True, chunk_elements=37 * 7)
    # A different row blocking may round the matmul differently, but only in the last bit.
    torch.testing.assert_close(whole[0], chunked[0], rtol=1e-6, atol=1e-5)
    assert torch.equal(whole[1], chunked[1])
    torch.testing.assert_close(whole[2], chunked[2], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("c", [1, 2, 7, 40])
def test_reference_top_c_equals_a_stable_full_sort_under_heavy_ties(c):
    g = torch.Generator().manual_seed(c)
    logits = torch.randint(0, 5, (300, 40), generator=g).double()  # many exact ties per row
    values, indices = reference.top_c(logits, c)
    want = torch.sort(logits, dim=1, descending=True, stable=True)
    assert torch.equal(values, want.values[:, :c])
    assert torch.equal(indices, want.indices[:, :c])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("scale", [1.0, 1e-23, 1e-40, 1e30])
def test_cuda_inference_only_and_tiny_rows(backend, scale):
    # The same two promises on CUDA (the compiled Triton kernel for "auto"): inputs that require
    # grad give outputs without a graph, and tiny/huge rows are normalised within the contract.
    X, W = _tiny_rows(scale, n=70, k=130, d=96) if scale != 1.0 else make_inputs(70, 130, 96, seed=3)
    Xc, Wc = X.cuda().requires_grad_(), W.cuda().requires_grad_()
    for mode in ("separate", "joint"):
        got = dk.score(Xc, Wc, c=3, mode=mode, reset=0.05, backend=backend)
        want = scores64(X, W, c=3, mode=mode, reset=0.05)
        for field in SCORE_FIELDS:
            value = getattr(got, field)
            assert value.is_cuda and value.grad_fn is None and not value.requires_grad
            assert_close_contract(value, want[field], torch.float32, f"cuda/{backend}/{mode}/{field}")
        assert_indices_match(got.topk_indices, want["topk_indices"], want["logits"], torch.float32)


@pytest.mark.parametrize("backend", dk.available_backends("cpu"))
@pytest.mark.parametrize("c", [1, 2])
def test_outside_sum_survives_a_gap_beyond_the_exponent_range(backend, c):
    """Raw dot products can put the top logits more than ~709 above the rest (exp of the gap
    overflows even double): the outside log-sum-exp must still be the rest's, not -inf."""
    g = torch.Generator().manual_seed(4)
    W = torch.randn(17, 13, generator=g)
    X = torch.randn(3, 13, generator=g)
    X[1] = W[9] * 8  # a top logit of ~8·|w|²/τ, hundreds above the others at τ = 1/32
    got = dk.score(X, W, c=c, temperature=0.03125, normalize=False, backend=backend)
    want = scores64(X, W, temperature=0.03125, c=c, normalize=False)
    for name in ("delta_energy", "energy", "msp", "max_logit"):
        assert_close_contract(getattr(got, name), want[name], torch.float32, name)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64])
def test_top1_derivation_is_bit_identical_to_the_general_one(mode, out_dtype):
    # c = 1 (the default) takes a shorter derivation; it must not move a single bit.
    from deltakern.core import state

    g = torch.Generator().manual_seed(3)
    n = 4000
    top = torch.randn(n, 1, generator=g, dtype=torch.float64) * 30
    outside = top[:, 0] - torch.rand(n, generator=g, dtype=torch.float64) * 200 + 5  # gaps either way
    outside[:7] = -math.inf  # K == c: nothing outside the list
    outside[7:20] = top[7:20, 0]  # ties with the top logit
    indices = torch.randint(0, 1000, (n, 1), generator=g)
    for reset in (0.0, -25.0, 40.0):
        fast = state.derive_scores(top, indices, outside, reset_logit=reset, mode=mode, out_dtype=out_dtype)
        general = state._derive(top, indices, outside, reset_logit=reset, mode=mode, out_dtype=out_dtype)
        for name, value in general.as_dict().items():
            assert torch.equal(getattr(fast, name), value), name
