"""bench/gpu_check.sh without a GPU: its dry run, and its summary when steps fail, time out or
the script is interrupted (a fake interpreter stands in for python3)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STEPS = ("build", "extension", "triton_tests", "loss_tests", "other_tests", "score_table", "loss_bench", "pipeline")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="a bash script")


def run(tmp_path, *args, env=None, timeout=120):
    full = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_CHECK_RESULTS": str(tmp_path / "results"), **(env or {})}
    if "PYTHON" not in (env or {}):
        full.pop("PYTHON", None)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=timeout)


def fake_python(tmp_path, body: str) -> str:
    path = tmp_path / "fake-python"
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def test_dry_run_lists_every_step_with_its_limit_and_runs_nothing(tmp_path):
    proc = run(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    limits = {}
    for name in STEPS:
        m = re.search(rf"^{name}: timeout (\d+)s: (.*)$", out, re.M)
        assert m, f"step {name} missing from the dry run:\n{out}"
        limits[name] = int(m.group(1))
    budget = int(re.search(r"budget (\d+)s", out).group(1))
    assert sum(limits.values()) <= budget, f"step limits {limits} exceed the budget {budget}"
    assert "python 'python3'" in out  # the GPU image promises python3, not python
    for name in ("triton_tests", "loss_tests", "other_tests"):
        line = re.search(rf"^{name}: .*$", out, re.M).group(0)
        assert "--tb=short -rfE" in line and "gpu_check_test_deadline=" in line
        assert "gpu\\ and\\ not\\ slow" in line  # heavy tests are opt-in
    assert "heavy_tests: not asked for" in out
    assert "gpu_check summary" in out
    assert not (tmp_path / "results" / "build.log").exists() and not (tmp_path / "out").exists()


def test_heavy_tests_are_opt_in(tmp_path):
    proc = run(tmp_path, "--dry-run", env={"GPU_CHECK_HEAVY": "1"})
    assert re.search(r"^heavy_tests: timeout \d+s: .*gpu\\ and\\ slow", proc.stdout, re.M), proc.stdout


def test_failing_steps_still_give_a_summary_and_a_failing_status(tmp_path):
    py = fake_python(tmp_path, "exit 3")
    proc = run(tmp_path, env={"PYTHON": py, "GPU_CHECK_BUDGET_S": "200"})
    assert proc.returncode == 1
    summary = proc.stdout.split("gpu_check summary", 1)[1]
    assert "build: FAILED rc=3" in summary and "score_table: FAILED rc=3" in summary
    assert "NOT COLLECTED" in summary  # the test files could not be collected with this interpreter
    # The device machine hands back at most 8 files: the logs travel as one archive and a summary.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.tar.gz", "summary.txt"]
    with tarfile.open(tmp_path / "out" / "gpu_check.tar.gz") as archive:
        names = {Path(n).name for n in archive.getnames()}
    assert {"build.log", "score_table.log", "summary.txt"} <= names
    assert "build: FAILED rc=3" in (tmp_path / "out" / "summary.txt").read_text()


def test_a_step_past_its_limit_is_cut_and_reported(tmp_path):
    # pip "hangs"; the budget (20 s) caps the build step, and nothing is left for the others. The
    # step gets what the budget has left after the preflight (0-5 s on a loaded 2-core machine);
    # a step offered under 15 s would be skipped instead.
    py = fake_python(tmp_path, 'if [[ "$*" == *pip* ]]; then sleep 600; fi; exit 0')
    began = time.monotonic()
    proc = run(tmp_path, env={"PYTHON": py, "GPU_CHECK_BUDGET_S": "20"}, timeout=90)
    assert time.monotonic() - began < 60
    assert proc.returncode == 1
    summary = proc.stdout.split("gpu_check summary", 1)[1]
    cut = re.search(r"build: TIMED OUT after (\d+)s", summary)
    assert cut and 15 <= int(cut.group(1)) <= 21, summary
    assert "score_table: SKIPPED (out of time budget)" in summary


def test_an_interrupted_check_still_prints_its_summary_and_stops_its_step(tmp_path):
    pid_file = tmp_path / "step.pid"
    py = fake_python(tmp_path, f'if [[ "$*" == *pip* ]]; then echo $$ > {pid_file}; exec sleep 600; fi; exit 0')
    env = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_CHECK_RESULTS": str(tmp_path / "results"), "PYTHON": py}
    proc = subprocess.Popen(["bash", str(SCRIPT)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGTERM)  # what an outer `timeout` or a lost session sends
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "gpu_check summary" in out and "INTERRUPTED" in out, out
    # The step runs under `timeout` in a process group of its own: the script must stop it too.
    step = int(pid_file.read_text())
    for _ in range(50):
        try:
            os.kill(step, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(step, signal.SIGKILL)
        pytest.fail("the interrupted step's process was left running")


def test_gpu_check_steps_runs_only_the_named_steps(tmp_path):
    proc = run(tmp_path, "--dry-run", env={"GPU_CHECK_STEPS": "build loss_tests tiles"})
    assert proc.returncode == 0, proc.stderr
    ran = set(re.findall(r"^(\w+): timeout \d+s:", proc.stdout, re.M))
    assert ran == {"build", "loss_tests", "tiles"}, proc.stdout
    for name in set(STEPS) - ran:
        assert f"{name}: not asked for (GPU_CHECK_STEPS)" in proc.stdout
