"""pytest-benchmark suite for scoring: every provider of ``deltakern bench`` on small shapes.

The default test command runs each case once, as a test (``--benchmark-disable`` in
pyproject.toml): outputs are checked, nothing is timed. Track regressions with

    pytest bench --benchmark-enable --benchmark-autosave     # on the base commit
    pytest bench --benchmark-enable --benchmark-compare      # on the new commit

Each provider's output is checked against the reference before it is benchmarked, so a
regression in correctness fails instead of producing a number.
"""

from __future__ import annotations

import pytest
import torch

from deltakern.bench import providers as bp

SHAPES = [(4096, 100), (4096, 1000)]  # (N, K), D = 512, float32, c = 1
CPU_PROVIDERS = list(bp.score_providers("cpu"))
_REFERENCE: dict = {}


def _expected(case, inputs):
    key = (case.n, case.k, case.d, case.dtype, case.device)
    if key not in _REFERENCE:
        ref = next(p for p in bp.providers_for(case).values() if p.reference)
        _REFERENCE[key] = ref.factory(case)(*inputs)
    return _REFERENCE[key]


def _bench(benchmark, case, provider_name):
    inputs = bp.make_inputs(case)[0]
    provider = bp.providers_for(case)[provider_name]
    impl = provider.factory(case)
    out = impl(*inputs)  # checked first; also the warm-up (compilation)
    if provider.checked and not provider.reference:
        bp.check_output(case, out, _expected(case, inputs), inputs)
    benchmark.extra_info.update(
        provider=provider_name, shape=case.shape(), dtype=case.dtype, flops=case.flops(), bytes=case.bytes(), rows=case.n
    )
    if case.device == "cuda":
        def call():
            impl(*inputs)
            torch.cuda.synchronize()

        benchmark(call)
    else:
        benchmark(impl, *inputs)


@pytest.mark.parametrize("provider", CPU_PROVIDERS)
@pytest.mark.parametrize("n,k", SHAPES, ids=[f"N{n}-K{k}" for n, k in SHAPES])
def test_score_cpu(benchmark, provider, n, k):
    benchmark.group = f"score cpu N={n} K={k}"
    _bench(benchmark, bp.score_case(n, k), provider)


GPU_PROVIDERS = ["deltakern-triton", "eager", "compile-reference", "torch.mm"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("provider", GPU_PROVIDERS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_score_cuda(benchmark, provider, dtype):
    benchmark.group = f"score cuda N=262144 K=1000 {dtype}"
    _bench(benchmark, bp.score_case(262_144, 1000, dtype=dtype, device="cuda"), provider)
