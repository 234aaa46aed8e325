"""pytest-benchmark suite for the EBM loss: forward + backward of each loss provider.

Run once each, untimed, by the default test command; time them with
``pytest bench --benchmark-enable`` (see test_bench_scoring.py).
Outputs (loss and gradients) are checked against autograd of the reference before timing.
"""

from __future__ import annotations

import pytest
import torch

from deltakern.bench import providers as bp

SHAPES = [(256, 1000), (1024, 5000)]  # (B, K), D = 512, float32


def _bench(benchmark, case, provider_name):
    providers = bp.loss_providers(case.device)
    if provider_name not in providers:
        pytest.skip(f"{provider_name} is not available: {bp.loss_modules_status(case.device)}")
    inputs = bp.make_inputs(case)[0]
    step = providers[provider_name].factory(case)
    out = step(*inputs)
    if providers[provider_name].checked and not providers[provider_name].reference:
        reference = providers["autograd-reference"].factory(case)
        bp.check_output(case, out, reference(*inputs), inputs)
    benchmark.extra_info.update(provider=provider_name, shape=case.shape(), flops=case.flops(), rows=case.n)
    if case.device == "cuda":
        def call():
            step(*inputs)
            torch.cuda.synchronize()

        benchmark(call)
    else:
        benchmark(step, *inputs)


@pytest.mark.parametrize("provider", ["deltakern-fused", "autograd-reference", "torch.mm-fwd-bwd"])
@pytest.mark.parametrize("b,k", SHAPES, ids=[f"B{b}-K{k}" for b, k in SHAPES])
def test_loss_cpu(benchmark, provider, b, k):
    benchmark.group = f"loss cpu B={b} K={k}"
    _bench(benchmark, bp.loss_case(b, k), provider)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("provider", ["deltakern-fused", "autograd-reference", "torch.mm-fwd-bwd"])
def test_loss_cuda(benchmark, provider):
    benchmark.group = "loss cuda B=65536 K=20000"
    _bench(benchmark, bp.loss_case(65_536, 20_000, device="cuda"), provider)


def _bench_loss_script():
    """bench/bench_loss.py as a module (bench/ is not a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_loss", Path(__file__).with_name("bench_loss.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_loss_script_reports_fused_vs_the_three_gemms(tmp_path, capsys):
    if "deltakern-fused" not in bp.loss_providers("cpu"):
        pytest.skip(f"the fused loss is not available: {bp.loss_modules_status('cpu')}")
    script = _bench_loss_script()
    argv = ["--shapes", "48x70", "--d", "16", "--min-time", "0", "--pair-repeats", "2", "--out", str(tmp_path)]
    assert script.main(argv) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "three GEMMs" in line)
    assert line.startswith("B=48 K=70 D=16 cpu: fused fwd+bwd ")
    assert "peak extra memory fused " in line and "reference " in line
    assert (tmp_path / "loss_cpu.json").exists()
