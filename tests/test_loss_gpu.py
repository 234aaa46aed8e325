"""The fused EBM loss on CUDA tensors against the plain-PyTorch reference (GPU machines only)."""

from __future__ import annotations

import pytest
import torch

import deltakern as dk
from deltakern import loss as loss_module
from deltakern.reference.loss import ebm_loss_reference, masked_count

CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA, reason="needs a CUDA device"),
    pytest.mark.skipif(CUDA and not loss_module.fused_available("cuda"), reason="extension built without CUDA kernels"),
]

OPTIONS = [
    dict(),
    dict(target="label", ce_on="edited", lam=0.5, reset=-0.1),
    dict(reduction="sum", mask_ratio=0.25, temperature=0.07),
    dict(normalize=False, temperature=2.0, reduction="none", lam=1.5),
]


def problem(n, k, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).cuda()
    W = torch.randn(k, d, generator=g, dtype=torch.float64).to(dtype).cuda()
    labels = torch.randint(0, k, (n,), generator=g).cuda()
    return X.requires_grad_(True), W.requires_grad_(True), labels


def close(a, b, what):
    scale = max(float(b.detach().abs().max()), 1.0)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale, msg=what)


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 1, 65), (257, 1001, 65), (33, 17, 512), (4096, 20000, 64)])
@pytest.mark.parametrize("options", OPTIONS)
def test_cuda_fused_matches_reference_float32(shape, options):
    X, W, labels = problem(*shape, torch.float32, seed=sum(shape))
    fused, f_parts = dk.ebm_loss(X, W, labels, return_parts=True, **options)
    ref, r_parts = ebm_loss_reference(X, W, labels, return_parts=True, **options)
    assert fused.is_cuda
    close(fused, ref, "loss")
    close(f_parts["delta"], r_parts["delta"], "delta")
    grad_out = torch.randn_like(ref) if ref.dim() else None
    fx, fw = torch.autograd.grad(fused, (X, W), grad_out)
    rx, rw = torch.autograd.grad(ref, (X, W), grad_out)
    close(fx, rx, "grad X")
    close(fw, rw, "grad W")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_inputs(dtype):
    X, W, labels = problem(64, 33, 48, dtype, seed=3)
    fused = dk.ebm_loss(X, W, labels, target="label")
    ref = ebm_loss_reference(X, W, labels, target="label")
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("options", OPTIONS)
def test_cuda_gradcheck_float64(options):
    X, W, labels = problem(6, 5, 7, torch.float64, seed=11)

    def f(x, w):
        loss, parts = dk.ebm_loss(x, w, labels, return_parts=True, **options)
        return loss, parts["ce"], parts["delta"]

    assert torch.autograd.gradcheck(f, (X, W), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_cuda_opcheck():
    X, W, labels = problem(5, 4, 6, torch.float32, seed=9)
    options = (100.0, 0.0, masked_count(0.5, 6), True, False, True)
    torch.library.opcheck(torch.ops.deltakern.ebm_loss_forward.default, (X.detach(), W.detach(), labels) + options)


def test_cuda_memory_stays_below_the_full_logits():
    # B x K logits in float32 would be 4096 * 200000 * 4 B = 3.3 GB; the fused path holds chunks.
    X, W, labels = problem(4096, 200_000, 32, torch.float32, seed=1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    dk.ebm_loss(X, W, labels).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 4096 * 200_000 * 4 / 2, f"peak extra {extra / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------- edge cases (issue 15)


def _ops_args(X, W, labels, **kw):
    o = dict(inv_temp=100.0, reset=0.0, mask_count=masked_count(0.5, X.shape[1]), target_pred=True,
             ce_edited=False, normalize=True)
    o.update(kw)
    return (X, W, labels, *o.values())


@pytest.mark.parametrize("k", [1, 10, 33, 257, 5000])
@pytest.mark.parametrize("target_pred", [True, False])
def test_cuda_forward_and_backward_ops_match_cpu(k, target_pred):
    """The fused ops on CUDA against the same ops on CPU (float64: no TF32, no reduction-order
    noise to speak of), at K below, at and above one warp and one block of threads."""
    X, W, labels = problem(37, k, 24, torch.float64, seed=k)
    X, W = X.detach(), W.detach()
    args = _ops_args(X, W, labels, target_pred=target_pred)
    cpu_args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    got = torch.ops.deltakern.ebm_loss_forward(*args)
    want = torch.ops.deltakern.ebm_loss_forward(*cpu_args)
    for name, g, w in zip(("ce", "delta", "lse", "lse_other", "target", "edited", "keep"), got, want):
        if g.dtype in (torch.int64, torch.bool):
            assert torch.equal(g.cpu(), w), name
        else:
            torch.testing.assert_close(g.cpu(), w, rtol=1e-12, atol=1e-12, msg=name)
    ce, delta, lse, lse_other, target, edited, keep = got
    grads = torch.ops.deltakern.ebm_loss_backward(
        torch.ones_like(ce), torch.full_like(delta, 0.5), X, W, labels, target, lse, lse_other, edited, keep,
        100.0, 0.0, False, True, True, True)
    cpu_grads = torch.ops.deltakern.ebm_loss_backward(
        *(t.cpu() for t in (torch.ones_like(ce), torch.full_like(delta, 0.5), X, W, labels, target, lse, lse_other,
                            edited, keep)), 100.0, 0.0, False, True, True, True)
    for g, w in zip(grads, cpu_grads):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-10, atol=1e-12)


def test_cuda_exact_ties_in_the_target_argmax_go_to_the_lower_class():
    """Duplicate class rows give exactly tied logits: the target is the first of them, as on
    CPU and in the reference, whichever threads of the block hold them."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(300, 16, generator=g, dtype=torch.float64)
    W = torch.cat([base, base])  # class j and j + 300 are identical
    order = torch.randperm(600, generator=g)
    W = W[order]
    X = base[:50] + 1e-3 * torch.randn(50, 16, generator=g, dtype=torch.float64)
    labels = torch.zeros(50, dtype=torch.long)
    out = torch.ops.deltakern.ebm_loss_forward(*_ops_args(X.cuda(), W.cuda(), labels.cuda()))
    want = torch.ops.deltakern.ebm_loss_forward(*_ops_args(X, W, labels))
    assert torch.equal(out[4].cpu(), want[4])
    logits = torch.nn.functional.normalize(X, dim=1) @ torch.nn.functional.normalize(W, dim=1).T
    first = (logits == logits.max(dim=1, keepdim=True).values).double().argmax(dim=1)
    assert torch.equal(want[4], first)


def test_cuda_runs_on_a_non_default_stream():
    X, W, labels = problem(513, 1001, 64, torch.float32, seed=21)
    want = dk.ebm_loss(X, W, labels, reduction="none")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = dk.ebm_loss(X, W, labels, reduction="none")
        gx, gw = torch.autograd.grad(got.sum(), (X, W))
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    wx, ww = torch.autograd.grad(want.sum(), (X, W))
    # cuBLAS keeps a workspace per stream and may pick another algorithm on another stream, and
    # index_add_ accumulates W's sparse term with atomics: equal up to summation order.
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, wx, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gw, ww, rtol=1e-6, atol=1e-7)


def test_cuda_loss_ignores_the_global_tf32_switch():
    """A user's TF32 setting (made for something else) must not move the loss: the driver's
    matmuls run in float32 under a NoTF32 guard."""
    X, W, labels = problem(2048, 1000, 512, torch.float32, seed=23)
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        strict = dk.ebm_loss(X, W, labels, reduction="none")
        torch.backends.cuda.matmul.allow_tf32 = True
        loose = dk.ebm_loss(X, W, labels, reduction="none")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert torch.equal(strict, loose)


def test_cuda_nan_gradients_stay_nan_like_cpu():
    X, W, labels = problem(9, 40, 16, torch.float32, seed=25)
    X, W = X.detach(), W.detach()
    ce, delta, lse, lse_other, target, edited, keep = torch.ops.deltakern.ebm_loss_forward(*_ops_args(X, W, labels))
    grad_delta = torch.ones_like(delta)
    grad_delta[3] = float("nan")
    state = (torch.ones_like(ce), grad_delta, X, W, labels, target, lse, lse_other, edited, keep)
    gx, gw = torch.ops.deltakern.ebm_loss_backward(*state, 100.0, 0.0, False, True, True, True)
    cx, cw = torch.ops.deltakern.ebm_loss_backward(*(t.cpu() for t in state), 100.0, 0.0, False, True, True, True)
    assert torch.equal(torch.isnan(gx).cpu(), torch.isnan(cx)) and bool(torch.isnan(gx[3]).all())
    assert torch.equal(torch.isnan(gw).cpu(), torch.isnan(cw))


def test_cuda_temperature_whose_reciprocal_overflows_is_refused():
    X, W, labels = problem(4, 3, 8, torch.float32)
    with pytest.raises(ValueError, match="temperature must be at least"):
        dk.ebm_loss(X, W, labels, temperature=1e-300)
    with pytest.raises(RuntimeError, match="logits would overflow Float"):
        torch.ops.deltakern.ebm_loss_forward(*_ops_args(X.detach(), W.detach(), labels, inv_temp=1e300))
    torch.cuda.synchronize()
