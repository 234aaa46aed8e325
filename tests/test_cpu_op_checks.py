"""Direct calls of the compiled CPU op ``torch.ops.deltakern.fused_score_state`` with bad
arguments: each gets a clear RuntimeError naming the argument, never a hang, an out-of-bounds
read, garbage output or a write into the caller's tensors (issue 14, item 2)."""

from __future__ import annotations

import math

import pytest
import torch

from deltakern.ops import extension as _ext
from deltakern.pipeline.parallelism import torch_threads

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"extension not built: {_ext.unavailable_reason()}")


def op(x, w, inv_temp=100.0, c=1, normalize=True):
    return torch.ops.deltakern.fused_score_state(x, w, inv_temp, c, normalize)


def inputs(n=6, k=5, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).to(dtype), torch.randn(k, d, generator=g).to(dtype)


def expect_error(match, x, w, *args, **kwargs):
    """The call raises a RuntimeError matching ``match`` and leaves x and w as they were."""
    x_before, w_before = x.clone(), w.clone()
    with pytest.raises(RuntimeError, match=match):
        op(x, w, *args, **kwargs)
    assert torch.equal(x.nan_to_num(), x_before.nan_to_num()), "the failed call wrote into x"
    assert torch.equal(w.nan_to_num(), w_before.nan_to_num()), "the failed call wrote into w"


@pytest.mark.parametrize("x_shape,w_shape,match", [
    ((6,), (5, 8), r"x must be 2-D \[N, D\], got shape \[6\]"),
    ((2, 3, 8), (5, 8), r"x must be 2-D"),
    ((6, 8), (8,), r"w must be 2-D \[K, D\], got shape \[8\]"),
    ((6, 8), (5, 7), r"x and w must have the same D, got x \[6, 8\] and w \[5, 7\]"),
])
def test_shapes(x_shape, w_shape, match):
    expect_error(match, torch.randn(x_shape), torch.randn(w_shape))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64, torch.uint8])
@pytest.mark.parametrize("which", ["x", "w"])
def test_dtypes(dtype, which):
    x, w = inputs()
    if which == "x":
        x = x.to(dtype)
    else:
        w = w.to(dtype)
    expect_error(rf"{which} must be float16, bfloat16, float32 or float64, got", x, w)


@pytest.mark.parametrize("c", [0, -1, 6, 2**40])
def test_c_outside_1_to_k(c):
    x, w = inputs(k=5)
    expect_error(rf"c must satisfy 1 <= c <= K = 5 \(the rows of w\), got {c}", x, w, 100.0, c)


def test_empty_w_has_no_valid_c():
    x, _ = inputs()
    expect_error(r"c must satisfy 1 <= c <= K = 0", x, torch.empty(0, 8), 100.0, 1)


@pytest.mark.parametrize("inv_temp", [0.0, -1.0, math.nan, math.inf, -math.inf])
def test_inv_temp_must_be_finite_and_positive(inv_temp):
    x, w = inputs()
    expect_error(r"inv_temp must be finite and > 0", x, w, inv_temp)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_non_finite_x_row(bad, normalize, dtype):
    x, w = inputs(n=300, k=70, dtype=dtype)  # K > 64: the blocked epilogue loop runs too
    x[257, 3] = bad
    match = r"row 257 of x has a non-finite L2 norm" if normalize else r"the logits of row 257 are not finite"
    expect_error(match, x, w, 100.0, 2, normalize)


@pytest.mark.parametrize("normalize", [True, False])
def test_the_lowest_failing_row_is_named_whichever_thread_finds_it(normalize):
    # 20,000 rows of K = 70 make several chunks; with 2 threads, the chunks holding rows 200 and
    # 5000 run at the same time and both fail: the error must name row 200 on every call.
    x, w = inputs(n=20000, k=70)
    x[5000, 1] = math.nan
    x[200, 4] = math.inf
    match = r"row 200 of x has a non-finite L2 norm" if normalize else r"the logits of row 200 are not finite"
    with torch_threads(2):
        for _ in range(5):
            expect_error(match, x, w, 100.0, 1, normalize)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("normalize", [True, False])
def test_non_finite_w_row(bad, normalize):
    x, w = inputs(n=9, k=70)
    w[66, 0] = bad
    # Without normalize a -inf class column could otherwise hide in the outside sum as exp(-inf) = 0.
    x = x.abs() if bad == -math.inf else x
    match = r"row 66 of w has a non-finite L2 norm" if normalize else r"w holds NaN or ±inf"
    expect_error(match, x, w, 100.0, 1, normalize)


def test_a_nan_row_in_a_block_of_minus_inf_logits_cannot_leave_indices_unset():
    # All logits of a row non-finite: the op must refuse rather than return unset top-c entries.
    x, w = inputs(n=3, k=64)
    x[1] = -math.inf
    expect_error(r"the logits of row 1 are not finite", x, w.abs(), 1.0, 3, False)


@pytest.mark.parametrize("which", ["x", "w"])
def test_zero_row_with_normalize(which):
    x, w = inputs()
    (x if which == "x" else w)[2] = 0.0
    expect_error(rf"row 2 of {which} is zero; normalize=True needs rows with a non-zero norm", x, w)


def test_zero_row_without_normalize_is_valid():
    x, w = inputs(k=5)
    x[2] = 0.0
    values, indices, outside = op(x, w, 1.0, 1, False)
    assert values[2, 0] == 0 and indices[2, 0] == 0  # all logits 0: ties go to class 0
    assert math.isclose(float(outside[2]), math.log(4), rel_tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_overflowing_logits_are_refused(dtype):
    # Finite inputs whose raw dot products (normalize=False) or scaled logits overflow float32.
    x, w = inputs(dtype=dtype)
    expect_error(r"the logits of row 0 are not finite.*overflows", x * 1e30, w * 1e30, 1.0, 1, False)
    expect_error(r"the logits of row 0 are not finite", x, w, 1e300, 1, True)


@pytest.mark.parametrize("which", ["x", "w"])
def test_devices_must_be_cpu(which):
    # A mixed-device call reaches whichever kernel the dispatcher picks (here the Meta one); the
    # CPU kernel itself must refuse a non-CPU tensor, so it is called directly through its key.
    x, w = inputs()
    if which == "x":
        x = x.to("meta")
    else:
        w = w.to("meta")
    cpu_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(RuntimeError, match=f"this kernel takes CPU tensors, got x on {x.device} and w on {w.device}"):
        torch.ops.deltakern.fused_score_state.default.redispatch(cpu_only, x, w, 100.0, 1, True)


def test_sparse_inputs_are_refused():
    x, w = inputs()
    with pytest.raises((RuntimeError, NotImplementedError)):
        op(x.to_sparse(), w)


def test_empty_x_is_valid():
    _, w = inputs()
    values, indices, outside = op(torch.empty(0, 8), w, 100.0, 2)
    assert values.shape == (0, 2) and indices.shape == (0, 2) and outside.shape == (0,)


def test_inputs_that_require_grad_are_scored():
    # The kernel runs its GEMM without autograd (an out= matmul refuses inputs that require
    # grad); the op has no backward, so dk.score calls it under no_grad.
    x, w = inputs()
    got = op(x.clone().requires_grad_(), w.clone().requires_grad_(), 100.0, 2)
    want = op(x, w, 100.0, 2)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_bad_half_gemm_setting_is_refused(monkeypatch):
    monkeypatch.setenv("DELTAKERN_CPU_HALF_GEMM", "fastest")
    x, w = inputs(dtype=torch.bfloat16)
    expect_error(r"DELTAKERN_CPU_HALF_GEMM must be auto, mkl, avx512_bf16 or float32, got 'fastest'", x, w)
