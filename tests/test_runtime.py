"""The one runtime shared by encode, score and prompt tuning: device and precision resolution,
the process-group timeout, and the single-process collectives."""

from __future__ import annotations

import datetime

import pytest
import torch

from deltakern import runtime
from deltakern.runtime import devices


def test_auto_precision_follows_native_bf16_on_cpu(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert runtime.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert runtime.resolve_precision("auto", cpu) == "fp32"
    assert runtime.resolve_precision("bf16", cpu) == "bf16"  # an explicit choice is kept
    with pytest.raises(ValueError, match="precision must be one of"):
        runtime.resolve_precision("fp8", cpu)


def test_native_bf16_detection_asks_torch(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert devices.cpu_has_native_bf16()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert not devices.cpu_has_native_bf16()


def test_make_runtime_records_the_resolved_precision(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    rt = runtime.make_runtime("cpu", "auto")
    assert rt.precision == "bf16" and rt.autocast_dtype == torch.bfloat16 and rt.main
    rt.close()


@pytest.mark.parametrize("bad", ["gpu", "", "cuda:x", 3])
def test_bad_devices_name_the_argument(bad):
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        runtime.resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        runtime.resolve_device("cuda")


def test_dist_timeout_reads_the_environment(monkeypatch):
    monkeypatch.delenv("DELTAKERN_DIST_TIMEOUT_S", raising=False)
    assert runtime.dist_timeout() == datetime.timedelta(seconds=7200)
    monkeypatch.setenv("DELTAKERN_DIST_TIMEOUT_S", "90")
    assert runtime.dist_timeout() == datetime.timedelta(seconds=90)
    monkeypatch.setenv("DELTAKERN_DIST_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="DELTAKERN_DIST_TIMEOUT_S must be a number of seconds"):
        runtime.dist_timeout()


def test_single_process_collectives_are_identities():
    rt = runtime.Runtime(device=torch.device("cpu"), precision="fp32")
    values = torch.tensor([1.0, 2.0])
    assert rt.all_reduce_sum(values) is values
    assert rt.gather("x") == ["x"] and rt.broadcast(5) == 5
