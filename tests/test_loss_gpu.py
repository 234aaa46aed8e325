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
