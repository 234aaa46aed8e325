"""Benchmark cases, their inputs, the providers that compute them, and the answer check.

Scoring providers (each returns the scores of docs/conventions.md §2 for the same inputs):

- ``deltakern-<backend>``: ``dk.score`` with each backend available on the device (``cpp`` and
  ``reference`` on CPU, ``triton`` and ``reference`` on CUDA);
- ``eager``: what a user writes in plain PyTorch: normalise, one matmul into the full ``[N, K]``
  logits, ``logsumexp``, ``topk``, ``scatter`` the reset value, ``logsumexp`` again. Half inputs
  are upcast to float32 before the matmul (a half-precision logits matrix misses the accuracy
  contract by ~0.4% of each logit). When the full logits do not fit on the GPU, the same code runs
  over row blocks and the row says so;
- ``compile-reference``: ``torch.compile`` of the reference backend, called on row blocks;
- ``torch.mm``: the bare matmul of the same shape and dtype, the ceiling (not a scorer, so not
  checked).

Loss providers (forward + backward, gradients for X and W): ``deltakern-fused`` (``ebm_loss``
through the compiled custom ops), ``autograd-reference`` (autograd through
``deltakern.reference.loss.ebm_loss_reference``) and ``torch.mm-fwd-bwd`` (the three matmuls of a linear
layer's forward and backward, the ceiling).

:func:`check_output` compares a provider's output with the reference's (scores, or loss and
gradients) at the accuracy contract's tolerances (docs/conventions.md §3) and raises :class:`~deltakern.bench.harness.WrongAnswerError`
when they disagree.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from deltakern import bench as bm
from deltakern.core.constants import score_tolerance

TEMPERATURE = 0.01
SCORE_FIELDS = ("delta_energy", "energy", "max_logit", "msp")
CPU_COMPILE_CHUNK = 1 << 22  # logits per compiled block on CPU (the reference's own chunk)
CUDA_COMPILE_CHUNK = 1 << 26  # larger blocks on GPUs, where per-call launch overhead dominates


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One benchmark shape: ``suite`` "score" (rows N, classes K, dim D, top-c) or "loss"
    (batch N, classes K, dim D); ``dtype`` by name; inputs are generated from ``seed``."""

    suite: str
    n: int
    k: int
    d: int = 512
    c: int | None = 1
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    def shape(self) -> str:
        if self.suite == "loss":
            return f"B={self.n} K={self.k} D={self.d}"
        return f"N={self.n} K={self.k} D={self.d} c={self.c}"

    def flops(self) -> float:
        """Nominal FLOPs: the logits matmul (score) or forward + two backward matmuls (loss)."""
        matmul = 2.0 * self.n * self.k * self.d
        return 3 * matmul if self.suite == "loss" else matmul

    def bytes(self) -> float:
        """Minimal traffic: inputs read once, per-row outputs (or gradients) written once."""
        inputs = (self.n + self.k) * self.d * self.itemsize
        if self.suite == "loss":
            return 2.0 * inputs + 8.0 * self.n
        per_row = 4 * 4 + 8 + (self.c or 1) * (4 + 8)  # four float32 scores, pred, top-c values+indices
        return float(inputs + self.n * per_row)


def score_case(n: int, k: int, d: int = 512, c: int = 1, dtype: str = "float32", device: str = "cpu") -> Case:
    """A scoring case."""
    return Case("score", n, k, d, c, dtype, device)


def loss_case(b: int, k: int, d: int = 512, dtype: str = "float32", device: str = "cpu") -> Case:
    """An EBM-loss forward+backward case."""
    return Case("loss", b, k, d, None, dtype, device)


# ----------------------------------------------------------------------------- inputs


def make_inputs(case: Case, variants: int = 1) -> list[tuple[torch.Tensor, ...]]:
    """``variants`` input tuples for the case (``(X, W)`` or ``(X, W, labels)`` for the loss).

    The synthetic CLIP-like generator gives realistic logit statistics. Extra variants are
    row-rotated copies in separate memory, so timing loops do not reuse cached inputs.
    """
    from deltakern.ood.synthetic import make_synthetic

    device = torch.device(case.device)
    ood = 0.0 if case.suite == "loss" else 0.5
    data = make_synthetic(case.n, case.k, case.d, seed=case.seed, ood_fraction=ood)
    X = data.X.to(device=device, dtype=case.torch_dtype)
    W = data.W.to(device=device, dtype=case.torch_dtype)
    out = []
    for v in range(variants):
        x = X if v == 0 else torch.roll(X, shifts=(v * case.n) // variants + 1, dims=0)
        w = W if v == 0 else torch.roll(W, shifts=v, dims=0)
        if case.suite == "loss":
            labels = data.labels.to(device)
            if v:
                labels = torch.roll(labels, shifts=(v * case.n) // variants + 1, dims=0)
            out.append((x.detach().requires_grad_(True), w.detach().requires_grad_(True), labels))
        else:
            out.append((x, w))
    return out


# ----------------------------------------------------------------------------- score providers


def _scores_dict(s) -> dict[str, torch.Tensor]:
    return {"delta_energy": s.delta_energy, "energy": s.energy, "max_logit": s.max_logit, "msp": s.msp, "pred": s.pred}


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class RowBlocks:
    """Runs ``body(X_block, W)`` over row blocks, all rows at once unless the device runs out
    of memory, in which case the block halves until it fits; ``note`` records that."""

    def __init__(self, body: Callable, combine: Callable[[list], Any], rows: int | None = None, note: str = "") -> None:
        self.body, self.combine, self.rows, self.note = body, combine, rows, note

    def __call__(self, X: torch.Tensor, W: torch.Tensor):
        rows = self.rows or X.shape[0]
        while True:
            try:
                parts = [self.body(X[s : s + rows], W) for s in range(0, X.shape[0], rows)]
                break
            except RuntimeError as exc:
                if not _is_oom(exc) or rows == 1:
                    raise
            # Outside the except block the failed attempt's tensors are released, so the
            # allocator can hand their memory back before the retry.
            if X.is_cuda:
                torch.cuda.empty_cache()
            rows = max(1, rows // 2)
            self.note = f"chunked: {rows}-row blocks (the full [N, K] logits do not fit)"
        self.rows = rows
        return self.combine(parts)


def _cat_dicts(parts: list[dict]) -> dict:
    return parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def eager_scores(X: torch.Tensor, W: torch.Tensor, *, temperature: float = TEMPERATURE, c: int = 1, reset: float = 0.0) -> dict[str, torch.Tensor]:
    """The scores as a user writes them in plain PyTorch, with the full ``[N, K]`` logits."""
    x = torch.nn.functional.normalize(X.float(), dim=1)
    w = torch.nn.functional.normalize(W.float(), dim=1)
    logits = x @ w.T / temperature
    energy = torch.logsumexp(logits, dim=1)
    top_v, top_i = logits.topk(c, dim=1)
    delta = torch.zeros_like(energy)
    for i in range(c):  # separate mode: reset one top logit at a time
        edited = logits.scatter(1, top_i[:, i : i + 1], reset / temperature)
        delta = delta + (energy - torch.logsumexp(edited, dim=1))
    return {
        "delta_energy": delta,
        "energy": energy,
        "max_logit": top_v[:, 0],
        "msp": torch.exp(top_v[:, 0] - energy),
        "pred": top_i[:, 0],
    }


def _reference_block(x: torch.Tensor, w: torch.Tensor, c: int):
    # The whole block is one chunk of the reference, so the compiled graph has no Python loop
    # whose trip count depends on the shape (one graph serves every block size).
    from deltakern.reference import scoring as reference

    return reference.score_state(
        x, w, temperature=TEMPERATURE, c=c, normalize=True, chunk_elements=x.shape[0] * w.shape[0]
    )


class _NoCudaRuntimeNotice(logging.Filter):
    """Drops the one record ``torch.utils.cpp_extension`` logs at import on a machine with a CUDA
    toolkit (``nvcc`` on PATH or ``CUDA_HOME``) but no GPU: "No CUDA runtime is found, using
    CUDA_HOME=...". Inductor's CPU backend imports that module only for its C++ include and
    library paths; the CUDA path it resolves is never used for CPU code, so the warning reads
    like a failure where there is none. Every other record of that logger passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


_CPP_EXTENSION_LOGGER = "torch.utils.cpp_extension"


def _quiet_cuda_runtime_notice() -> None:
    """Install :class:`_NoCudaRuntimeNotice` once on torch's cpp_extension logger (only when no
    GPU is usable: with one, torch does not log the notice at all)."""
    if torch.cuda.is_available():
        return
    logger = logging.getLogger(_CPP_EXTENSION_LOGGER)
    if not any(isinstance(f, _NoCudaRuntimeNotice) for f in logger.filters):
        logger.addFilter(_NoCudaRuntimeNotice())


def _make_compiled_reference(case: Case) -> Callable:
    from deltakern.core.state import derive_scores
    from deltakern.reference import scoring as reference

    if torch.device(case.device).type == "cpu":
        # torch.compile imports torch.utils.cpp_extension lazily, at the first call below.
        _quiet_cuda_runtime_notice()
    compiled = torch.compile(_reference_block, dynamic=True)
    chunk = CUDA_COMPILE_CHUNK if case.device.startswith("cuda") else CPU_COMPILE_CHUNK
    rows = reference.chunk_rows(case.k, chunk)

    def run(X, W):
        parts = [compiled(X[s : s + rows], W, case.c) for s in range(0, X.shape[0], rows)]
        top_v, top_i, outside = (torch.cat(p) for p in zip(*parts))
        out_dtype = reference.accumulation_dtype(X, W)
        return _scores_dict(derive_scores(top_v, top_i, outside, reset_logit=0.0, mode="separate", out_dtype=out_dtype))

    return run


def _make_mm(case: Case) -> Callable:
    def body(x, w):
        # The output buffer is reused across blocks: the ceiling is the matmul, not the allocator.
        if body.buf is None or body.buf.shape[0] < x.shape[0]:
            body.buf = torch.empty((x.shape[0], w.shape[0]), dtype=x.dtype, device=x.device)
        return torch.mm(x, w.T, out=body.buf[: x.shape[0]])

    body.buf = None
    return RowBlocks(body, combine=lambda parts: parts[-1], note="one output buffer, reused across calls")


def _make_backend(backend: str) -> Callable[[Case], Callable]:
    def factory(case: Case) -> Callable:
        from deltakern.scoring import score

        return lambda X, W: _scores_dict(score(X, W, temperature=TEMPERATURE, c=case.c, backend=backend))

    return factory


@dataclass(frozen=True)
class Provider:
    """A benchmarked implementation: ``factory(case)`` returns ``impl(*inputs) -> output``."""

    name: str
    kind: str  # "deltakern" | "baseline" | "ceiling"
    factory: Callable[[Case], Callable]
    checked: bool = True
    reference: bool = False  # its output is what the others are checked against


def score_providers(device: str) -> dict[str, Provider]:
    """The scoring providers usable on ``device``, by name."""
    from deltakern.scoring import available_backends

    providers: dict[str, Provider] = {}
    for backend in available_backends(device):
        if backend == "triton" and torch.device(device).type == "cpu":
            continue  # the Triton interpreter is a test vehicle, far too slow to benchmark
        providers[f"deltakern-{backend}"] = Provider(
            f"deltakern-{backend}", "deltakern", _make_backend(backend), reference=backend == "reference"
        )
    providers["eager"] = Provider(
        "eager", "baseline",
        lambda case: RowBlocks(lambda x, w: eager_scores(x, w, c=case.c), combine=_cat_dicts),
    )
    providers["compile-reference"] = Provider("compile-reference", "baseline", _make_compiled_reference)
    providers["torch.mm"] = Provider("torch.mm", "ceiling", _make_mm, checked=False)
    return providers


# ----------------------------------------------------------------------------- loss providers


def _loss_step(loss_fn: Callable) -> Callable:
    def step(X, W, labels):
        loss = loss_fn(X, W, labels, temperature=TEMPERATURE)
        dX, dW = torch.autograd.grad(loss, (X, W))
        return {"loss": loss.detach(), "dX": dX, "dW": dW}

    return step


def _make_fused_loss(case: Case) -> Callable:
    from deltakern.loss import ebm_loss

    return _loss_step(ebm_loss)


def _make_reference_loss(case: Case) -> Callable:
    from deltakern.reference.loss import ebm_loss_reference

    return _loss_step(ebm_loss_reference)


def _make_mm_fwd_bwd(case: Case) -> Callable:
    grads: dict[tuple, torch.Tensor] = {}

    def step(X, W, labels):
        x, w = X.detach(), W.detach()
        logits = x @ w.T
        key = (tuple(logits.shape), logits.dtype, logits.device)
        if key not in grads:  # a fixed upstream gradient, made once outside the timed work
            grads[key] = torch.randn_like(logits)
        g = grads[key]
        return {"logits": logits, "dX": g @ w, "dW": g.T @ x}

    return step


def loss_modules_status(device: str) -> dict[str, str | None]:
    """``{provider: None if usable else why not}`` for the loss providers."""
    import importlib.util

    status: dict[str, str | None] = {}
    if importlib.util.find_spec("deltakern.loss") is None:
        status["deltakern-fused"] = "deltakern.loss is not part of this installation"
    else:
        from deltakern.loss import fused_available

        status["deltakern-fused"] = None if fused_available(device) else (
            f"the fused EBM-loss ops have no kernel for {torch.device(device).type} tensors"
        )
    if importlib.util.find_spec("deltakern.reference.loss") is None:
        status["autograd-reference"] = "deltakern.reference.loss is not part of this installation"
    else:
        status["autograd-reference"] = None
    status["torch.mm-fwd-bwd"] = None
    return status


def loss_providers(device: str) -> dict[str, Provider]:
    """The loss providers usable on ``device``, by name (the fused one only with its kernels)."""
    status = loss_modules_status(device)
    all_providers = {
        "deltakern-fused": Provider("deltakern-fused", "deltakern", _make_fused_loss),
        "autograd-reference": Provider("autograd-reference", "baseline", _make_reference_loss, reference=True),
        "torch.mm-fwd-bwd": Provider("torch.mm-fwd-bwd", "ceiling", _make_mm_fwd_bwd, checked=False),
    }
    if status["autograd-reference"] is not None:
        return {}  # nothing to check a loss against
    return {name: p for name, p in all_providers.items() if status[name] is None}


def providers_for(case: Case) -> dict[str, Provider]:
    """The providers of the case's suite on its device."""
    return score_providers(case.device) if case.suite == "score" else loss_providers(case.device)




# ----------------------------------------------------------------------------- checking


def _worst_ratio(actual: torch.Tensor, expected: torch.Tensor, tol: float, *, normwise: bool = False) -> float:
    """max |a - e| / bound: element-wise bound ``tol·max(|e|, 1)`` (docs/conventions.md §2), or for
    gradients the norm-wise bound ``tol·max|e|``."""
    a, e = actual.detach().double(), expected.detach().double()
    if a.shape != e.shape:
        raise bm.WrongAnswerError(f"shape {tuple(a.shape)} differs from the reference's {tuple(e.shape)}")
    if not bool(torch.isfinite(a).all()):
        return math.inf
    err = (a - e).abs()
    if normwise:
        return float(err.max()) / max(tol * float(e.abs().max()), 1e-30)
    return float((err / (e.abs() * tol).clamp(min=tol)).max())


def _pred_gap_ok(actual: torch.Tensor, expected: torch.Tensor, X, W, tol: float) -> bool:
    """Predictions may differ only where the two classes' float64 logits are within tolerance."""
    rows = torch.nonzero(actual != expected).flatten()
    if rows.numel() == 0:
        return True
    x = torch.nn.functional.normalize(X[rows].double(), dim=1)
    w = torch.nn.functional.normalize(W.double(), dim=1)
    logits = x @ w.T / TEMPERATURE
    la = logits.gather(1, actual[rows].view(-1, 1).to(logits.device))
    le = logits.gather(1, expected[rows].view(-1, 1).to(logits.device))
    return bool(((la - le).abs() <= 2 * tol * le.abs().clamp(min=1)).all())


def check_output(case: Case, actual: dict, expected: dict, inputs: tuple) -> float:
    """Compare a provider's output with the reference's at the contract's tolerance (docs/conventions.md §3).

    Returns the worst error relative to its bound (<= 1); raises :class:`WrongAnswerError`
    naming the field otherwise.
    """
    tol = score_tolerance(case.dtype)
    worst = 0.0
    if case.suite == "score":
        for name in SCORE_FIELDS:
            ratio = _worst_ratio(actual[name], expected[name], tol)
            if not ratio <= 1.0:
                raise bm.WrongAnswerError(f"{name} differs from the reference: worst error {ratio:.3g}x the tolerance {tol:g}")
            worst = max(worst, ratio)
        if not _pred_gap_ok(actual["pred"], expected["pred"], inputs[0], inputs[1], tol):
            raise bm.WrongAnswerError("pred differs from the reference beyond ties")
    else:
        for name, normwise in (("loss", False), ("dX", True), ("dW", True)):
            ratio = _worst_ratio(actual[name], expected[name], tol, normwise=normwise)
            if not ratio <= 1.0:
                raise bm.WrongAnswerError(f"{name} differs from the reference: worst error {ratio:.3g}x the tolerance {tol:g}")
            worst = max(worst, ratio)
    return worst


def case_call(case_fields: dict, provider_name: str) -> Callable[[], Any]:
    """The zero-argument call of a provider on a case's inputs (built in a memory child)."""
    case = Case(**case_fields)
    inputs = make_inputs(case, 1)[0]
    impl = providers_for(case)[provider_name].factory(case)
    return lambda: impl(*inputs)
