"""The pure-Python build (``DELTAKERN_BUILD_CPP=0``): a wheel without the compiled extension
that ships every subpackage, imports from outside the source tree and scores through the
reference backend."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_pure_python_wheel_installs_and_scores(tmp_path):
    env = {**os.environ, "DELTAKERN_BUILD_CPP": "0"}
    # Build from a copy of the sources: an in-tree build would reuse files left in build/.
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "cmake-build", "__pycache__", "*.egg-info", "*.so", ".pytest_cache", "out", "runs"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-cache-dir", "-q",
         "-w", str(tmp_path / "wheel"), str(source)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("deltakern-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.endswith((".so", ".pyd"))]
    packages = {str(p.parent.relative_to(REPO)) for p in (REPO / "deltakern").rglob("__init__.py")}
    shipped = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    assert packages <= shipped, f"subpackages missing from the wheel: {sorted(packages - shipped)}"

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        # The development checkout is installed editable: its import hook would still hand out the
        # checkout's deltakern._C, so the probe drops that hook and sees only the unpacked wheel.
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
        "import torch, deltakern as dk\n"
        "from deltakern.ops import extension\n"
        "assert not extension.available(), 'the pure-Python build has no compiled extension'\n"
        "assert dk.available_backends('cpu') == ['reference'], dk.available_backends('cpu')\n"
        "X, W = torch.randn(9, 8), torch.randn(5, 8)\n"
        "r = dk.score(X, W, c=2)\n"
        "ref = torch.logsumexp(torch.nn.functional.normalize(X, dim=1) @ torch.nn.functional.normalize(W, dim=1).T / 0.01, 1)\n"
        "torch.testing.assert_close(r.energy, ref)\n"
        "print(dk.__file__)\n"
    )
    # Run from outside the repository with only the unpacked wheel on the path.
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    clean_env["PYTHONPATH"] = str(site)
    run = subprocess.run([sys.executable, "-c", probe], env=clean_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().startswith(str(site))
