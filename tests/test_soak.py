"""Crash soak: SIGKILL ``deltakern score`` at random moments (during the shards and during the final
merge), rerun it each time, and compare the result with an uninterrupted run: the parquet file
byte for byte, the manifest apart from its timing fields.

    python tests/test_soak.py [--images 2000] [--kills 20] [--seed 0] [--dir DIR]

prints one line per kill and ``identical K/N`` last. The pytest test (marked slow) runs it.

Each run is a fork of one driver process that has imported torch, open_clip and deltakern once,
so a run starts in a second instead of a fresh interpreter's ten: this keeps twenty kills and
reruns over a couple of thousand images within a few minutes on two cores. The driver itself
computes nothing with torch (no thread pools exist when it forks). To cover every part of a run
without redoing all of it each time, a trial first rewinds a finished output to an earlier state
a crash could leave — a random subset of the shards missing, the merged file and manifest gone
(or, for a merge trial, only those) — then starts the run and kills it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SHARD = 25


def make_images(root: Path, n: int, seed: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        path = root / f"{i % 10}" / f"img{i:05d}.{'png' if i % 2 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).save(path)
    (root / "9" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")


def score_argv(work: Path, out: Path) -> list[str]:
    return [
        "score", "--model", "deltakern-tiny", "--pretrained", "none", "--images", str(work / "images"),
        "--classes", str(work / "classes.txt"), "--templates", "single", "--c", "2", "--shard-size", str(SHARD),
        "--batch-size", str(SHARD), "--workers", "0", "--device", "cpu", "--no-progress",
        "--cache-dir", str(work / "cache"), "--out", str(out),
    ]  # fmt: skip


def start(argv: list[str]) -> int:
    """Fork a child that runs ``deltakern ARGV`` quietly; returns its pid."""
    pid = os.fork()
    if pid == 0:  # the child
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1), os.dup2(devnull, 2)
            import warnings

            from deltakern.cli import main

            warnings.simplefilter("ignore")
            code = main(argv)
        except BaseException:
            code = 1
        os._exit(code)
    return pid


def run_to_end(argv: list[str]) -> None:
    _, status = os.waitpid(start(argv), 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"a rerun failed (status {status}): deltakern {' '.join(argv)}")


def fingerprint(out: Path) -> tuple[str, str]:
    """The parquet's bytes and the manifest without its timing fields, hashed."""
    manifest = json.loads(out.with_suffix(".manifest.json").read_text())
    manifest.pop("timing")
    manifest["last_run"] = {k: v for k, v in manifest["last_run"].items() if not k.endswith("_s")}
    for key in ("shards_done_now", "shards_skipped"):  # what this particular rerun had left to do
        manifest["last_run"].pop(key)
    manifest["last_run"].pop("images"), manifest["last_run"].pop("rows"), manifest["last_run"].pop("errors")
    return hashlib.sha256(out.read_bytes()).hexdigest(), hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def merge_temporary(out: Path) -> bool:
    return any(p.name.startswith(f".{out.name}.") and p.name.endswith(".tmp") for p in out.parent.iterdir())


def rewind(out: Path, rng: random.Random, fraction: float) -> None:
    """Put a finished output back into a state a crash could leave: some shards missing (their
    part and record gone), no merged file and no manifest."""
    out.unlink()
    out.with_suffix(".manifest.json").unlink()
    parts = out.with_suffix(".parts")
    records = sorted(parts.glob("part-*.json"))
    for record in rng.sample(records, max(1, int(len(records) * fraction))) if fraction else []:
        record.unlink()
        record.with_suffix(".parquet").unlink()


def soak(work: Path, n_images: int, kills: int, seed: int) -> int:
    import open_clip  # noqa: F401  (imported once here; every forked run reuses it)
    import pyarrow.parquet  # noqa: F401

    import deltakern.cli  # noqa: F401

    rng = random.Random(seed)
    if not (work / "images").is_dir():
        make_images(work / "images", n_images, seed)
        (work / "classes.txt").write_text("cat\ndog\nbird\nfish\ncar\n")
    reference = work / "reference" / "scores.parquet"
    t0 = time.perf_counter()
    run_to_end(score_argv(work, reference))
    full_s = time.perf_counter() - t0
    expected = fingerprint(reference)
    print(f"uninterrupted run: {full_s:.1f} s for {n_images} images", flush=True)

    out = work / "soaked" / "scores.parquet"
    run_to_end(score_argv(work, out))
    identical = 0
    merge_trials = max(1, kills // 4)
    for trial in range(kills):
        in_merge = trial >= kills - merge_trials
        fraction = 0.0 if in_merge else rng.uniform(0.1, 0.3)
        rewind(out, rng, fraction)
        while True:  # until a kill lands while the run is still working
            pid = start(score_argv(work, out))
            t_start = time.perf_counter()
            if in_merge:
                while not merge_temporary(out) and time.perf_counter() - t_start < 5 * full_s:
                    time.sleep(0.0005)
            else:
                time.sleep(rng.uniform(0.0, fraction * full_s * 1.2 + 1.0))
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            if os.WIFSIGNALED(status):
                break
            rewind(out, rng, fraction)  # it finished first: try again from the same kind of state
        killed_at = time.perf_counter() - t_start
        during_merge = merge_temporary(out)
        run_to_end(score_argv(work, out))
        same = fingerprint(out) == expected
        leftovers = [p.name for d in (out.parent, out.with_suffix(".parts")) for p in d.iterdir() if p.name.endswith(".tmp")]
        identical += same and not leftovers
        print(
            f"kill {trial + 1:2d}: after {killed_at:5.2f} s ({'during the merge' if during_merge else 'during the shards'}, "
            f"{fraction:.0%} of the shards to redo): {'identical' if same else 'DIFFERENT'}"
            f"{', leftovers ' + str(leftovers) if leftovers else ''}",
            flush=True,
        )
    print(f"identical {identical}/{kills}", flush=True)
    return identical


@pytest.mark.slow
def test_crash_soak(tmp_path):
    pytest.importorskip("pyarrow")  # the clip extra: the scored parquet it checks
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, __file__, "--dir", str(tmp_path), "--images", "2000", "--kills", "20"],
        capture_output=True, text=True, timeout=1800, cwd=repo, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "identical 20/20"
    assert sum("during the merge" in line for line in proc.stdout.splitlines()) >= 5


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", type=Path, required=True)
    a = p.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    identical = soak(a.dir, a.images, a.kills, a.seed)
    sys.exit(0 if identical == a.kills else 1)


if __name__ == "__main__":
    main()
