"""The compiled EBM loss ops check their own arguments (torch.ops.deltakern.* called directly).

``dk.ebm_loss`` validates its inputs before it reaches the ops, but the ops are public through
``torch.ops`` and must never hang, read out of bounds or return silent garbage when called
directly: every bad argument below gets a RuntimeError that says what is wrong. The CUDA
variants (marked gpu) also check that the CUDA context survives the error.
"""

from __future__ import annotations

import math

import pytest
import torch

from deltakern import loss as loss_module

pytestmark = pytest.mark.skipif(not loss_module.fused_available("cpu"), reason="the compiled extension is not built")

N, K, D = 6, 5, 8
MASK = 4


def ops():
    from deltakern.ops import registry

    registry.fused_score_state  # noqa: B018 (importing the registry registers fakes and autograd once)
    return torch.ops.deltakern


def forward_args(device="cpu", **changes):
    g = torch.Generator().manual_seed(0)
    args = dict(
        x=torch.randn(N, D, generator=g), w=torch.randn(K, D, generator=g),
        labels=torch.randint(0, K, (N,), generator=g), inv_temp=100.0, reset=0.0, mask_count=MASK,
        target_pred=True, ce_edited=False, normalize=True,
    )
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    args.update(changes)
    return args


def call_forward(args):
    return ops().ebm_loss_forward(*args.values())


def backward_args(device="cpu", **changes):
    f = forward_args(device)
    ce, delta, lse, lse_other, target, edited, keep = call_forward(f)
    args = dict(
        grad_ce=torch.ones_like(ce), grad_delta=torch.ones_like(delta), x=f["x"], w=f["w"],
        labels=f["labels"], target=target, lse=lse, lse_other=lse_other, edited=edited, keep=keep,
        inv_temp=f["inv_temp"], reset=f["reset"], ce_edited=False, normalize=True, needs_x=True, needs_w=True,
    )
    args.update(changes)
    return args


def call_backward(args):
    return ops().ebm_loss_backward(*args.values())


def with_row(t: torch.Tensor, row: int, value: float) -> torch.Tensor:
    t = t.clone()
    t[row] = value
    return t


def with_entry(t: torch.Tensor, row: int, col: int, value: float) -> torch.Tensor:
    t = t.clone()
    t[row, col] = value
    return t


NAN_ROW = "row {0} (has non-finite logits|of x has a non-finite L2 norm)"
BAD_FORWARD = {
    "x 1-D": (dict(x=torch.randn(N * D)), "x and w must be 2-D"),
    "D mismatch": (dict(w=torch.randn(K, D + 1)), "same D, got 8 and 9"),
    "no rows": (dict(x=torch.randn(0, D), labels=torch.zeros(0, dtype=torch.long)), "empty x or w"),
    "no classes": (dict(w=torch.randn(0, D)), "empty x or w"),
    "no columns": (dict(x=torch.randn(N, 0), w=torch.randn(K, 0)), "empty x or w"),
    "integer x": (dict(x=torch.ones(N, D, dtype=torch.int32)), "must be float16, bfloat16, float32 or float64, got Int"),
    "labels shape": (dict(labels=torch.zeros(N + 1, dtype=torch.long)), r"labels must have shape \[N\] = \[6\]"),
    "float labels": (dict(labels=torch.zeros(N)), "labels must be an integer tensor, got Float"),
    "label = K": (dict(labels=torch.tensor([0, 1, K, 2, 3, 4])), r"labels must lie in \[0, K\) = \[0, 5\), got values in \[0, 5\]"),
    "label < 0": (dict(labels=torch.tensor([0, -1, 2, 2, 3, 4])), r"labels must lie in \[0, K\).*\[-1, 4\]"),
    "label = K, label target": (dict(labels=torch.tensor([0, 1, K, 2, 3, 4]), target_pred=False), r"labels must lie in \[0, K\)"),
    "mask_count 0": (dict(mask_count=0), r"mask_count must be in \[1, D\] = \[1, 8\], got 0"),
    "mask_count D+1": (dict(mask_count=D + 1), r"mask_count must be in \[1, D\].*got 9"),
    "inv_temp nan": (dict(inv_temp=math.nan), "inv_temp .* must be finite, > 0"),
    "inv_temp inf": (dict(inv_temp=math.inf), "inv_temp .* must be finite, > 0"),
    "inv_temp 0": (dict(inv_temp=0.0), "inv_temp .* must be finite, > 0"),
    "inv_temp < 0": (dict(inv_temp=-100.0), "inv_temp .* must be finite, > 0"),
    # temperature 1e-300 passes a bare "> 0" check, but 1/τ overflows float32 logits.
    "inv_temp overflows float32": (dict(inv_temp=1e300), "logits would overflow Float"),
    "reset nan": (dict(reset=math.nan), "reset must be finite"),
    # With normalize the CPU op finds a NaN row at its norm (before any logit), the CUDA op at its
    # logits: either way the error names the row.
    "NaN row": (dict(x=with_row(torch.randn(N, D), 2, math.nan)), NAN_ROW.format(2)),
    "NaN entry": (dict(x=with_entry(torch.randn(N, D), 3, 1, math.nan)), NAN_ROW.format(3)),
    "NaN row, label target": (dict(x=with_row(torch.randn(N, D), 2, math.nan), target_pred=False), NAN_ROW.format(2)),
    "+inf entry, unnormalised": (dict(x=with_entry(torch.randn(N, D), 4, 0, math.inf), normalize=False, inv_temp=1.0), "row 4 has non-finite logits"),
    "-inf row, unnormalised": (dict(x=with_row(torch.randn(N, D), 1, -math.inf), normalize=False, inv_temp=1.0), "row 1 has non-finite logits"),
    # Finite inputs whose dot products overflow float32: every logit of the row is ±inf.
    "overflowing products": (dict(x=with_row(torch.randn(N, D), 0, 1e30), w=torch.full((K, D), 1e30), normalize=False, inv_temp=1.0),
                             "row 0 has non-finite logits"),
}


@pytest.mark.parametrize("case", list(BAD_FORWARD))
def test_forward_rejects_bad_arguments(case):
    changes, message = BAD_FORWARD[case]
    with pytest.raises(RuntimeError, match=message):
        call_forward(forward_args(**changes))


def test_forward_accepts_every_float_dtype_and_int32_labels():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        a = forward_args()
        out = call_forward(forward_args(x=a["x"].to(dtype), w=a["w"].to(dtype), labels=a["labels"].int()))
        assert all(bool(torch.isfinite(t).all()) for t in out[:4])


BAD_BACKWARD = {
    "target = K": (lambda a: dict(target=with_row(a["target"], 0, K)), r"target must lie in \[0, K\) = \[0, 5\)"),
    "target < 0": (lambda a: dict(target=with_row(a["target"], 0, -3)), r"target must lie in \[0, K\).*\[-3,"),
    "label = K": (lambda a: dict(labels=with_row(a["labels"], 5, K)), r"labels must lie in \[0, K\)"),
    "keep shape": (lambda a: dict(keep=a["keep"][:, :-1]), "keep must be a bool tensor of x's shape"),
    "keep dtype": (lambda a: dict(keep=a["keep"].float()), "keep must be a bool tensor"),
    "grad_ce shape": (lambda a: dict(grad_ce=torch.ones(N + 1)), r"grad_ce must have shape \[N\] = \[6\]"),
    "lse integer": (lambda a: dict(lse=torch.zeros(N, dtype=torch.long)), "lse must be a floating-point tensor"),
    "target float": (lambda a: dict(target=a["target"].float()), "target must be an integer tensor"),
    "edited 2-D": (lambda a: dict(edited=a["edited"][:, None]), r"edited must have shape \[N\]"),
    "inv_temp overflows": (lambda a: dict(inv_temp=1e300), "logits would overflow Float"),
    "x 1-D": (lambda a: dict(x=a["x"].flatten()), "x and w must be 2-D"),
}


@pytest.mark.parametrize("case", list(BAD_BACKWARD))
def test_backward_rejects_bad_arguments(case):
    make, message = BAD_BACKWARD[case]
    args = backward_args()
    args.update(make(args))
    with pytest.raises(RuntimeError, match=message):
        call_backward(args)


def test_backward_keeps_nan_gradients_nan():
    """A NaN upstream gradient gives NaN gradients (never a finite number that hides it)."""
    args = backward_args()
    args["grad_delta"] = with_row(args["grad_delta"], 2, math.nan)
    gx, gw = call_backward(args)
    assert bool(torch.isnan(gx[2]).all()) and bool(torch.isfinite(gx[[0, 1, 3, 4, 5]]).all())
    assert bool(torch.isnan(gw).any())


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.parametrize("case", list(BAD_FORWARD))
@pytest.mark.gpu
def test_cuda_forward_rejects_bad_arguments_and_the_context_survives(case):
    if not (torch.cuda.is_available() and loss_module.fused_available("cuda")):
        pytest.skip("needs a CUDA device and the CUDA kernels")
    changes, message = BAD_FORWARD[case]
    args = forward_args(**changes)
    args = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(RuntimeError, match=message):
        call_forward(args)
    torch.cuda.synchronize()  # a device-side assert or an out-of-bounds read would surface here
    call_forward(forward_args("cuda"))
    torch.cuda.synchronize()


@pytest.mark.parametrize("case", list(BAD_BACKWARD))
@pytest.mark.gpu
def test_cuda_backward_rejects_bad_arguments(case):
    if not (torch.cuda.is_available() and loss_module.fused_available("cuda")):
        pytest.skip("needs a CUDA device and the CUDA kernels")
    make, message = BAD_BACKWARD[case]
    args = backward_args("cuda")
    args.update({k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in make(args).items()})
    with pytest.raises(RuntimeError, match=message):
        call_backward(args)
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_cuda_mixed_devices_are_refused():
    if not (torch.cuda.is_available() and loss_module.fused_available("cuda")):
        pytest.skip("needs a CUDA device and the CUDA kernels")
    args = forward_args("cuda")
    args["labels"] = args["labels"].cpu()
    with pytest.raises(RuntimeError, match="must be on one device"):
        call_forward(args)
    b = backward_args("cuda")
    b["lse"] = b["lse"].cpu()
    with pytest.raises(RuntimeError, match="lse must be on cuda"):
        call_backward(b)
