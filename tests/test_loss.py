"""The EBM loss (docs/conventions.md §6): reference vs hand computation, fused ops vs reference, gradcheck,
opcheck, bad input (docs/conventions.md §8) and a short training loop.
"""

from __future__ import annotations

import math

import pytest
import torch
from oracle import logits64

import deltakern as dk
from deltakern import loss as loss_module
from deltakern.ops import registry
from deltakern.reference.loss import ebm_loss_reference, masked_count

FUSED = loss_module.fused_available("cpu")
needs_fused = pytest.mark.skipif(not FUSED, reason="the compiled extension is not built")

OPTION_GRID = [
    dict(),
    dict(target="label"),
    dict(ce_on="edited"),
    dict(target="label", ce_on="edited", lam=2.5),
    dict(lam=0.0, reduction="sum"),
    dict(lam=0.3, mask_ratio=0.2, reset=-0.3, reduction="none"),
    dict(mask_ratio=0.9, reset=0.2, temperature=0.05),
    dict(normalize=False, temperature=1.0, reset=-0.5),
    dict(normalize=False, temperature=0.5, target="label", ce_on="edited", reduction="none"),
]


def make_problem(n, k, d, dtype=torch.float64, seed=0, label_pred_rows=0):
    """Random embeddings and labels; the first ``label_pred_rows`` labels equal the prediction
    (so that ``y == t`` occurs with ``target="pred"`` and ``ce_on="edited"``)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    W = torch.randn(k, d, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, k, (n,), generator=g)
    if label_pred_rows:
        pred = logits64(X, W, 0.01).argmax(1)
        labels[:label_pred_rows] = pred[:label_pred_rows]
    return X, W, labels


def hand_loss(X, W, labels, *, temperature=0.01, lam=1.0, mask_ratio=0.5, reset=0.0,
              target="pred", ce_on="original", normalize=True):
    """Per-row (loss, ce, delta) in float64 with explicit Python loops over rows and dimensions."""
    x = X.double()
    w = W.double()
    if normalize:
        x = x / x.norm(dim=1, keepdim=True)
        w = w / w.norm(dim=1, keepdim=True)
    ell = logits64(X, W, temperature, normalize)
    n, d = x.shape
    count = math.ceil(round(mask_ratio * d, 9))
    out = []
    for i in range(n):
        row = ell[i].tolist()
        t = max(range(len(row)), key=lambda j: (row[j], -j)) if target == "pred" else int(labels[i])
        q = [float(x[i, j] * w[t, j]) for j in range(d)]
        ranked = sorted(range(d), key=lambda j: (-q[j], j))  # largest first, lower dim on ties
        masked = set(ranked[:count])
        s = sum(q[j] for j in range(d) if j not in masked)
        edited = list(row)
        edited[t] = max(s, reset) / temperature
        lse = math.log(sum(math.exp(v - max(row)) for v in row)) + max(row)
        lse_e = math.log(sum(math.exp(v - max(edited)) for v in edited)) + max(edited)
        y = int(labels[i])
        ce = lse - row[y] if ce_on == "original" else lse_e - edited[y]
        delta = lse_e - lse
        out.append((ce + lam * delta, ce, delta))
    return torch.tensor(out, dtype=torch.float64)


def close(a, b, what=""):
    """Within 1e-5 relative of the value, or of the largest entry (at least 1) for entries that
    cancel to ~0 (with D = 1 and normalisation the exact gradient is 0 and only rounding is left)."""
    scale = max(float(b.detach().abs().max()), 1.0)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale, msg=what)


def both_paths(X, W, labels, **kw):
    """(fused, reference) results of the same call."""
    return dk.ebm_loss(X, W, labels, **kw), ebm_loss_reference(X, W, labels, **kw)


# ----------------------------------------------------------------------------- definitions


@pytest.mark.parametrize("options", OPTION_GRID)
def test_reference_and_fused_match_hand_computation(options):
    X, W, labels = make_problem(6, 5, 7, label_pred_rows=2)
    kw = {k: v for k, v in options.items() if k != "reduction"}
    expected = hand_loss(X, W, labels, **kw)
    for fn in (ebm_loss_reference, dk.ebm_loss):
        loss, parts = fn(X, W, labels, reduction="none", return_parts=True, **kw)
        torch.testing.assert_close(loss, expected[:, 0], rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(parts["ce"], expected[:, 1], rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(parts["delta"], expected[:, 2], rtol=1e-12, atol=1e-10)


def test_reductions_and_parts():
    X, W, labels = make_problem(9, 4, 5)
    rows, parts = dk.ebm_loss(X, W, labels, lam=0.7, reduction="none", return_parts=True)
    assert rows.shape == (9,) and parts["ce"].shape == (9,) and parts["delta"].shape == (9,)
    torch.testing.assert_close(rows, parts["ce"] + 0.7 * parts["delta"])
    mean, mean_parts = dk.ebm_loss(X, W, labels, lam=0.7, return_parts=True)
    torch.testing.assert_close(mean, rows.mean())
    torch.testing.assert_close(mean_parts["delta"], parts["delta"].mean())
    total = dk.ebm_loss(X, W, labels, lam=0.7, reduction="sum")
    torch.testing.assert_close(total, rows.sum())
    module = dk.EBMLoss(lam=0.7, reduction="sum")
    torch.testing.assert_close(module(X, W, labels), total)


def test_delta_is_a_lower_bound_of_minus_delta_energy_term():
    # With the clamp, LSE(l) - LSE(l~) <= ΔE_1 for every row (target="pred").
    X, W, labels = make_problem(40, 11, 9)
    for reset in (0.0, 0.3, -0.2):
        _, parts = dk.ebm_loss(X, W, labels, reset=reset, reduction="none", return_parts=True)
        de1 = dk.delta_energy(X, W, reset=reset)
        assert bool((-parts["delta"] <= de1 + 1e-9).all())


def test_masked_count_is_the_ceiling():
    assert masked_count(0.5, 3) == 2
    assert masked_count(0.3, 10) == 3  # 0.3 * 10 is 3.0000000000000004 in binary
    assert masked_count(0.01, 10) == 1
    assert masked_count(0.999, 10) == 10


def test_tied_products_mask_the_lower_dimension_first():
    # K = 1, no normalisation: l = x.w / tau, CE = 0, and L = lam * (max(s~, r) - x.w) / tau.
    # q = [1, 1, 1, 0.5] masks two of the three tied entries: dimensions 0 and 1.
    X = torch.tensor([[1.0, 1.0, 1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    W = torch.tensor([[1.0, 1.0, 1.0, 0.5]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0])
    expected_grad = torch.tensor([[-1.0, -1.0, 0.0, 0.0]], dtype=torch.float64) / 0.5
    for fn in (ebm_loss_reference, dk.ebm_loss):
        loss = fn(X, W, labels, normalize=False, temperature=0.5, reset=-10.0)
        assert float(loss.detach()) == pytest.approx((1.5 - 3.5) / 0.5)
        (gx,) = torch.autograd.grad(loss, X)
        torch.testing.assert_close(gx, expected_grad)


# ----------------------------------------------------------------------------- fused vs reference


@needs_fused
@pytest.mark.parametrize(
    "shape",
    # The last three span several of the CPU ops' class blocks (1024 classes) and row tiles (256
    # rows), and the second several backward regions (1024 rows); the last is large enough
    # (N·K·D >= 2^28) for the CPU ops to use every thread.
    [(1, 1, 3), (1, 13, 5), (7, 1, 65), (5, 3, 1), (257, 1001, 65), (33, 17, 512), (300, 2500, 17),
     (1030, 2100, 9), (520, 1100, 512)],
)
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(target="label", ce_on="edited", lam=0.5, reset=-0.1),
        dict(reduction="sum", mask_ratio=0.25, temperature=0.07),
        dict(normalize=False, temperature=2.0, reduction="none", lam=1.5),
    ],
)
def test_fused_matches_reference_float32(shape, options):
    n, k, d = shape
    X, W, labels = make_problem(n, k, d, dtype=torch.float32, seed=n * 31 + k, label_pred_rows=min(n, 3))
    X.requires_grad_(True)
    W.requires_grad_(True)
    (fused, f_parts), (ref, r_parts) = both_paths(X, W, labels, return_parts=True, **options)
    assert fused.dtype == torch.float32

    close(fused, ref, "loss")
    close(f_parts["ce"], r_parts["ce"], "ce")
    close(f_parts["delta"], r_parts["delta"], "delta")
    grad_out = torch.randn_like(ref) if ref.dim() else None
    fx, fw = torch.autograd.grad(fused, (X, W), grad_out)
    rx, rw = torch.autograd.grad(ref, (X, W), grad_out)
    close(fx, rx, "grad X")
    close(fw, rw, "grad W")


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(dtype):
    X, W, labels = make_problem(19, 7, 24, dtype=dtype, seed=3)
    X.requires_grad_(True)
    W.requires_grad_(True)
    fused, ref = both_paths(X, W, labels, target="label")
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    fx, fw = torch.autograd.grad(fused, (X, W))
    rx, rw = torch.autograd.grad(ref, (X, W))
    assert fx.dtype == dtype and fw.dtype == dtype
    torch.testing.assert_close(fx.float(), rx.float(), rtol=1e-2, atol=1e-2 * float(rx.float().abs().max()))
    torch.testing.assert_close(fw.float(), rw.float(), rtol=1e-2, atol=1e-2 * float(rw.float().abs().max()))


@needs_fused
@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs two threads")
def test_fused_backward_is_reentrant_on_several_threads():
    # Threads take groups of classes dynamically; the result must not depend on who took what.
    X, W, labels = make_problem(1100, 1030, 512, dtype=torch.float32, seed=7)
    X.requires_grad_(True)
    W.requires_grad_(True)
    loss = dk.ebm_loss(X, W, labels, target="label", ce_on="edited")
    first = torch.autograd.grad(loss, (X, W), retain_graph=True)
    for _ in range(3):
        again = torch.autograd.grad(loss, (X, W), retain_graph=True)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


# Row scales whose float32 sums of squares underflow (1e-21: subnormal squares; 1e-30: zero) or
# overflow (1e20), next to ordinary rows.
ROW_SCALES = (1.0, 1e-21, 1e-30, 1e20, 3.0)


@needs_fused
@pytest.mark.parametrize("options", [dict(), dict(target="label", ce_on="edited", lam=0.5, reset=-0.1)])
def test_tiny_and_huge_rows_match_the_float64_reference(options):
    n, k, d = 10, 2100, 33  # K spans class blocks, so W's rows are read as given and as a copy
    X, W, labels = make_problem(n, k, d, seed=11, label_pred_rows=2)
    X = X * torch.tensor([ROW_SCALES[i % 5] for i in range(n)], dtype=torch.float64)[:, None]
    W = W * torch.tensor([ROW_SCALES[(i + 1) % 5] for i in range(k)], dtype=torch.float64)[:, None]
    X32, W32 = X.float().requires_grad_(True), W.float().requires_grad_(True)
    X64, W64 = X.clone().requires_grad_(True), W.clone().requires_grad_(True)
    grad_out = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref, r_parts = ebm_loss_reference(X64, W64, labels, reduction="none", return_parts=True, **options)
    rx, rw = torch.autograd.grad(ref, (X64, W64), grad_out)
    x_norm, w_norm = X.norm(dim=1, keepdim=True), W.norm(dim=1, keepdim=True)
    for fn in (dk.ebm_loss, ebm_loss_reference):  # the fused CPU ops and the float32 reference
        loss, parts = fn(X32, W32, labels, reduction="none", return_parts=True, **options)
        close(loss.double(), ref, "loss")
        close(parts["delta"].double(), r_parts["delta"], "delta")
        fx, fw = torch.autograd.grad(loss, (X32, W32), grad_out.float())
        # A row's gradient scales as 1/|row|: compared times the row norms, every row is O(1).
        close(fx.double() * x_norm, rx * x_norm, "grad X")
        close(fw.double() * w_norm, rw * w_norm, "grad W")


@needs_fused
def test_gradients_only_for_inputs_that_require_them():
    X, W, labels = make_problem(8, 5, 6, dtype=torch.float32)
    Xg = X.clone().requires_grad_(True)
    dk.ebm_loss(Xg, W, labels).backward()
    assert Xg.grad is not None and W.grad is None
    Wg = W.clone().requires_grad_(True)
    dk.ebm_loss(X, Wg, labels).backward()
    assert Wg.grad is not None
    rx, rw = torch.autograd.grad(ebm_loss_reference(X.requires_grad_(True), W.requires_grad_(True), labels), (X, W))
    close(Xg.grad, rx, "grad X")
    close(Wg.grad, rw, "grad W")
    with torch.no_grad():
        assert dk.ebm_loss(X, W, labels).requires_grad is False


def test_inputs_are_never_written():
    X, W, labels = make_problem(6, 4, 5, dtype=torch.float32)
    X.requires_grad_(True)
    W.requires_grad_(True)
    before = (X.detach().clone(), W.detach().clone(), labels.clone())
    dk.ebm_loss(X, W, labels, ce_on="edited").backward()
    for now, then in zip((X.detach(), W.detach(), labels), before):
        assert torch.equal(now, then)


def test_reference_fallback_without_extension(monkeypatch):
    X, W, labels = make_problem(5, 4, 6)
    expected = dk.ebm_loss(X, W, labels, reduction="none")
    monkeypatch.setattr(loss_module, "fused_available", lambda device: False)
    torch.testing.assert_close(dk.ebm_loss(X, W, labels, reduction="none"), expected)


# ----------------------------------------------------------------------------- gradcheck


def _gradcheck(X, W, labels, options):
    X = X.clone().requires_grad_(True)
    W = W.clone().requires_grad_(True)

    def f(x, w):
        loss, parts = dk.ebm_loss(x, w, labels, return_parts=True, **options)
        return loss, parts["ce"], parts["delta"]

    assert torch.autograd.gradcheck(f, (X, W), eps=1e-6, atol=1e-6, rtol=1e-5)


@needs_fused
@pytest.mark.parametrize("options", OPTION_GRID)
def test_gradcheck_float64(options):
    X, W, labels = make_problem(6, 5, 7, seed=11, label_pred_rows=2)
    _gradcheck(X, W, labels, options)


@needs_fused
@pytest.mark.parametrize("target", ["pred", "label"])
@pytest.mark.parametrize("ce_on", ["original", "edited"])
def test_gradcheck_clamp_active_and_inactive_rows(target, ce_on):
    X, W, labels = make_problem(8, 5, 7, seed=5, label_pred_rows=2)
    registry.ensure_registered()
    out = torch.ops.deltakern.ebm_loss_forward(
        X, W, labels, 100.0, 0.0, masked_count(0.5, 7), target == "pred", ce_on == "edited", True
    )
    edited = out[5].sort().values
    reset = float(edited[3] + edited[4]) / 2  # half of the rows below it: clamp active there
    active = out[5] < reset
    assert 0 < int(active.sum()) < X.shape[0]
    _gradcheck(X, W, labels, dict(target=target, ce_on=ce_on, reset=reset, lam=0.8))


@needs_fused
@pytest.mark.parametrize("target", ["pred", "label"])
def test_gradcheck_rows_with_tied_products(target):
    # Rows 0 and 1 have exact ties in x_hat * w_hat_0, inside the masked set (3, 3) and inside the
    # kept set (-0.52, -0.52), so the mask is locally constant and the gradient exists.
    X, W, labels = make_problem(4, 4, 6, seed=2)
    W[0] = torch.tensor([2.0, 2.0, 0.9, 1.3, 1.3, 1.8], dtype=torch.float64)
    X[0] = torch.tensor([1.5, 1.5, 0.7, -0.4, -0.4, 1.1], dtype=torch.float64)
    X[1] = 2.0 * X[0]
    labels[:2] = 0
    x_hat = X / X.norm(dim=1, keepdim=True)
    w_hat = W / W.norm(dim=1, keepdim=True)
    q = x_hat[0] * w_hat[0]
    assert q[0] == q[1] and q[3] == q[4]
    assert bool((logits64(X, W, 0.01)[:2].argmax(1) == 0).all())
    _gradcheck(X, W, labels, dict(target=target, mask_ratio=0.5))
    _gradcheck(X, W, labels, dict(target=target, mask_ratio=0.5, ce_on="edited", reset=-1.0))


# ----------------------------------------------------------------------------- opcheck


@needs_fused
@pytest.mark.parametrize(
    "args",
    [
        dict(n=5, k=4, d=6, target_pred=True, ce_edited=False, normalize=True, dtype=torch.float32),
        dict(n=3, k=1, d=5, target_pred=False, ce_edited=True, normalize=False, dtype=torch.float64),
    ],
)
def test_opcheck(args):
    registry.ensure_registered()
    X, W, labels = make_problem(args["n"], args["k"], args["d"], dtype=args["dtype"], seed=9)
    count = masked_count(0.5, args["d"])
    options = (100.0, 0.0, count, args["target_pred"], args["ce_edited"], args["normalize"])
    forward = torch.ops.deltakern.ebm_loss_forward.default
    torch.library.opcheck(forward, (X, W, labels) + options)
    torch.library.opcheck(forward, (X.requires_grad_(True), W.requires_grad_(True), labels) + options)
    with torch.no_grad():
        out = forward(X, W, labels, *options)
    g = torch.randn(args["n"], dtype=out[0].dtype)
    backward = torch.ops.deltakern.ebm_loss_backward.default
    for needs_x, needs_w in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(
            backward,
            (g, 0.5 * g, X.detach(), W.detach(), labels, out[4], out[2], out[3], out[5], out[6],
             100.0, 0.0, args["ce_edited"], args["normalize"], needs_x, needs_w),
        )


# ----------------------------------------------------------------------------- bad input


BAD_INPUTS = [
    (dict(labels=torch.tensor([0, 1, 4])), ValueError, "labels"),
    (dict(labels=torch.tensor([0, -1, 2])), ValueError, "labels"),
    (dict(labels=torch.tensor([0.0, 1.0, 2.0])), TypeError, "labels"),
    (dict(labels=torch.tensor([0, 1])), ValueError, "labels"),
    (dict(mask_ratio=0.0), ValueError, "mask_ratio"),
    (dict(mask_ratio=1.0), ValueError, "mask_ratio"),
    (dict(mask_ratio=1.5), ValueError, "mask_ratio"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    # > 0 and finite, but 1/τ overflows float32 logits: every logit would be inf, the loss NaN.
    (dict(temperature=1e-300), ValueError, "temperature must be at least 5.88e-39"),
    (dict(temperature=5e-39), ValueError, "temperature must be at least"),
    (dict(target="top1"), ValueError, "target"),
    (dict(ce_on="both"), ValueError, "ce_on"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(lam=float("nan")), ValueError, "lam"),
    (dict(reset=float("inf")), ValueError, "reset"),
    (dict(normalize=1), TypeError, "normalize"),
    (dict(return_parts="yes"), TypeError, "return_parts"),
    (dict(X=torch.ones(3, 5, dtype=torch.int64)), TypeError, "X"),
    (dict(X=torch.ones(5)), ValueError, "X"),
    (dict(X=torch.ones(3, 4)), ValueError, "X.shape"),
    (dict(X=torch.tensor([[1.0, float("nan"), 0, 0, 0]] * 3)), ValueError, "X"),
    (dict(X=torch.zeros(3, 5)), ValueError, "X"),
    (dict(W=torch.zeros(0, 5)), ValueError, "W"),
]


@pytest.mark.parametrize("bad, error, name", BAD_INPUTS)
def test_bad_input_names_the_argument(bad, error, name):
    args = dict(X=torch.randn(3, 5), W=torch.randn(4, 5), labels=torch.tensor([0, 1, 3]))
    args.update(bad)
    X, W, labels = args.pop("X"), args.pop("W"), args.pop("labels")
    with pytest.raises(error, match=name):
        dk.ebm_loss(X, W, labels, **args)
    with pytest.raises(error, match=name):
        ebm_loss_reference(X, W, labels, **args)


@pytest.mark.parametrize(
    "bad, error, name",
    [(b, e, n) for b, e, n in BAD_INPUTS if not {"X", "W", "labels"} & set(b)],
)
def test_bad_module_argument_fails_at_construction(bad, error, name):
    with pytest.raises(error, match=name):
        dk.EBMLoss(**bad)


# ----------------------------------------------------------------------------- training


def test_sgd_decreases_loss_and_increases_delta_energy():
    # 6 classes, fixed image embeddings around class prototypes, learnable class embeddings
    # starting from noisy prototypes: 200 SGD steps of the EBM loss must lower the loss and raise
    # ΔEnergy of the training rows.
    g = torch.Generator().manual_seed(0)
    k, d, per_class = 6, 16, 8
    prototypes = torch.randn(k, d, generator=g)
    labels = torch.arange(k).repeat_interleave(per_class)
    X = prototypes[labels] + 0.8 * torch.randn(k * per_class, d, generator=g)
    W = (prototypes + 1.5 * torch.randn(k, d, generator=g)).requires_grad_(True)
    criterion = dk.EBMLoss(temperature=0.05, lam=1.0)
    optimizer = torch.optim.SGD([W], lr=0.05)
    de_before = dk.delta_energy(X, W.detach(), temperature=0.05).mean()
    losses = []
    for _ in range(200):
        optimizer.zero_grad()
        loss = criterion(X, W, labels)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    de_after = dk.delta_energy(X, W.detach(), temperature=0.05).mean()
    # The ΔEnergy term is negative, so the loss may be too: compare differences, not ratios.
    assert losses[-1] < losses[0] - 1.0, (losses[0], losses[-1])
    assert sum(losses[-10:]) < sum(losses[:10]), (losses[:10], losses[-10:])
    assert float(de_after) > float(de_before) + 1.0, (float(de_before), float(de_after))
