"""The compiled CPU op: registration, opcheck, fallbacks, and import hygiene."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import deltakern as dk
from deltakern.ops import extension as _ext
from deltakern.ops import registry as _ops

needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"extension not built: {_ext.unavailable_reason()}")


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=120
    )


@needs_ext
def test_op_has_cpu_and_meta_kernels():
    ops = _ops.registered_ops()
    assert "fused_score_state" in ops
    assert {"CPU", "Meta"} <= set(ops["fused_score_state"])


@needs_ext
@pytest.mark.parametrize("n,k,d,c", [(1, 1, 3, 1), (7, 3, 65, 2), (130, 257, 16, 5), (0, 4, 8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck(n, k, d, c, dtype):
    x = torch.randn(n, d, dtype=dtype)
    w = torch.randn(k, d, dtype=dtype)
    torch.library.opcheck(torch.ops.deltakern.fused_score_state.default, (x, w, 100.0, c, True))


@needs_ext
def test_op_matches_reference_state():
    from deltakern.reference import scoring as reference

    x, w = torch.randn(300, 40), torch.randn(150, 40)
    got = _ops.fused_score_state(x, w, 1 / 0.05, 4, True)
    want = reference.score_state(x, w, temperature=0.05, c=4, normalize=True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)


@needs_ext
def test_op_works_under_torch_compile():
    x, w = torch.randn(20, 8), torch.randn(6, 8)
    fn = torch.compile(lambda a, b: _ops.fused_score_state(a, b, 10.0, 2, True), backend="eager", fullgraph=True)
    got, want = fn(x, w), _ops.fused_score_state(x, w, 10.0, 2, True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_import_never_initialises_cuda():
    out = run_python(
        "import torch, deltakern as dk; dk.score(torch.randn(4, 8), torch.randn(3, 8));"
        "import deltakern.cli; deltakern.cli.build_parser();"
        "print(torch.cuda.is_initialized())"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_import_does_not_pull_heavy_modules():
    out = run_python(
        "import sys, deltakern;"
        "print(sorted(m for m in ('triton', 'open_clip', 'matplotlib', 'pyarrow') if m in sys.modules))"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_without_extension_falls_back_to_reference_and_says_so():
    code = (
        "import json, torch, deltakern as dk;"
        "from deltakern.cli.commands.env import collect;"
        "r = dk.score(torch.randn(5, 8), torch.randn(4, 8), c=2);"
        "print(json.dumps({'backends': dk.available_backends('cpu'), 'env': collect()['extension'],"
        " 'n': len(r)}))"
    )
    out = run_python(code, DELTAKERN_DISABLE_EXT="1")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["backends"] == ["reference"] and report["n"] == 5
    assert report["env"]["loaded"] is False and "DELTAKERN_DISABLE_EXT" in report["env"]["reason"]
    asked = run_python(
        "import torch, deltakern as dk; dk.score(torch.randn(5, 8), torch.randn(4, 8), backend='cpp')",
        DELTAKERN_DISABLE_EXT="1",
    )
    assert asked.returncode != 0 and "backend='cpp' is not available" in asked.stderr
    assert "available: 'reference'" in asked.stderr


def test_env_command_reports_extension_and_backends():
    out = subprocess.run([sys.executable, "-m", "deltakern.cli", "env", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["torch"] == torch.__version__
    assert report["devices"]["cpu"]["auto"] == dk.available_backends("cpu")[0 if "triton" not in dk.available_backends("cpu") else 1]
    assert report["extension"]["loaded"] == _ext.available()
