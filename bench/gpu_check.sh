#!/usr/bin/env bash
# The single GPU check (docs/architecture.md §6), for a bare CUDA machine with PyTorch, Triton, pytest and
# numpy preinstalled and no network (the GPU image: Python 3.12, PyTorch 2.11, Triton 3.6). From the
# repository root:
#
#     bash bench/gpu_check.sh              # logs and tables in out/gpu_check ($GPU_CHECK_RESULTS)
#     bash bench/gpu_check.sh --dry-run    # list the steps, their commands and limits; run nothing
#     GPU_CHECK_HEAVY=1 bash bench/gpu_check.sh   # also the opt-in heavy GPU tests (see below)
#
# Before: on a machine with PyPI, `bash bench/fetch_gpu_wheels.sh` (open_clip wheels for the GPU
# image, into the git-ignored .gpu_wheels/, which must travel with the checkout).
#
# When $OUT is set (the device machine's return folder, which hands back at most 8 files), the
# results folder is also packed into $OUT/gpu_check.tar.gz beside $OUT/summary.txt at the end.
#
# Steps, in order of importance, each under its own `timeout` (LIMIT, capped by what is left of
# the BUDGET): a step that would get under 15 s is skipped and says so. A failing or timed-out
# step never stops the later ones, and the summary is printed last even when the script itself
# is interrupted (trap on EXIT, INT and TERM). Exit status: non-zero when any step failed.
#
#   build        120 s  pip install -e . (C++ and the CUDA kernels for this GPU's arch only)
#   extension     20 s  deltakern._C loads, with CUDA kernels, and its argument errors come back
#                       as RuntimeErrors with their numbers (CPU and CUDA)
#   triton_tests 150 s  tests/test_triton_gpu.py without the heavy tests. Counted on the CPU by
#                       specialising each of its kernel launches as Triton does
#                       (deltakern.ops.triton.compiled.specialize): 27 distinct fused kernels to
#                       compile, 3 of them at c = 16, and 3 GEMM baselines. Cold compiles on a 2-core CPU take ~3-5 s (c <= 5) and
#                       ~10 s (c = 16), so ~125 s of compiles at worst + ~20 s of tests; Triton's
#                       cache (~/.triton) makes a rerun on the same machine cheap.
#   loss_tests    50 s  tests/test_loss_gpu.py and tests/test_ops_checks.py (no Triton compiles;
#                       the largest case is B = 4096, K = 200,000)
#   other_tests   30 s  every other tests/ file with a gpu mark (the CUDA metrics)
#   score_table   90 s  bench/bench_gpu_score.py at K = 1000 (bf16, float32): dk.score, its kernel
#                       alone, the Triton GEMM baseline, torch.mm, eager, torch.compile
#   loss_bench    30 s  the fused EBM loss at B = 65,536
#   pipeline      30 s  image pipeline throughput (only when open_clip is importable)
#   heavy_tests  150 s  opt-in (GPU_CHECK_HEAVY=1): tests marked `gpu and slow` (10 autotune
#                       configs, an Inductor compile, the 2.2M- and 33.5M-row cases)
#   bench_tests   90 s  opt-in (GPU_CHECK_HEAVY=1): the pytest-benchmark files' GPU cases (they
#                       repeat score_table and loss_bench, with Inductor compiles of their own)
#   tiles        200 s  opt-in (GPU_CHECK_HEAVY=1 or named in GPU_CHECK_STEPS): bench/bench_gpu_tiles.py,
#                       the fused kernel's tile sweep at N = 1e6, K = 1000 (bf16: 16 configs,
#                       float32: 5; a compile and two timings each)
#
# GPU_CHECK_STEPS="build extension loss_tests ..." runs only the named steps (a follow-up run
# after a fix). Test steps run in two pytest-xdist workers when xdist is importable (the GPU
# image has it), so a test that crashes the interpreter is reported and the others still run;
# GPU_CHECK_PYTEST_ARGS replaces those arguments ("" runs in one process).
#
# Every pytest step prints each test's result as it finishes (-v), failures with short
# tracebacks and a summary of failures and errors (--tb=short -rfE), and stops any single test
# after TEST_DEADLINE_S (a SIGALRM raised in the test, as pytest-timeout's signal method does;
# the GPU image has no pytest-timeout): a cut-off step keeps every result before it.
set -u

DRY_RUN=0
[[ ${1:-} == --dry-run ]] && DRY_RUN=1
# The default budget is the sum of the step limits below (+440 s for the opt-in heavy steps); a
# device lease is 15 minutes including the machine's start-up.
BUDGET_S=${GPU_CHECK_BUDGET_S:-$(( ${GPU_CHECK_HEAVY:-0} == 1 ? 960 : 520 ))}
TEST_DEADLINE_S=${GPU_CHECK_TEST_DEADLINE_S:-60}
RESULTS=${GPU_CHECK_RESULTS:-out/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$RESULTS"
# deltakern imports from the checkout even if the editable install below fails (the reference and
# Triton backends need no compiled code), so later steps still report something useful.
export PYTHONPATH="$PWD:$RESULTS${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS
declare -a SUMMARY=()
FAILED=0
GPU_NAME="(not queried)"
VERSIONS=""

remaining() { echo $((BUDGET_S - (SECONDS - START))); }

summary() {
    echo
    echo "================ gpu_check summary ================"
    echo "GPU: $GPU_NAME; $VERSIONS; commit $(git rev-parse --short=12 HEAD 2>/dev/null || echo '?'); $((SECONDS - START))s of ${BUDGET_S}s"
    for line in "${SUMMARY[@]}"; do echo "  $line"; done
    if (( ! DRY_RUN )); then
        $PY - "$RESULTS" <<'EOF' 2>/dev/null || true
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name, ours, base in (("gpu_score.json", "deltakern-triton", "eager"), ("loss_cuda.json", "deltakern-fused", "autograd-reference")):
    path = out / name
    if not path.exists():
        continue
    rows = json.loads(path.read_text())["rows"]
    gemm = {(r["shape"], r["dtype"]): r["median_ms"] for r in rows if r["provider"] == "triton-gemm" and r["status"] == "ok"}
    kernel = {(r["shape"], r["dtype"]): r["median_ms"] for r in rows if r["provider"] == "triton-kernel" and r["status"] == "ok"}
    for r in rows:
        if r["provider"] == ours and r["status"] == "ok":
            pct = "-" if r["pct_of_ceiling"] is None else f"{r['pct_of_ceiling']:.0f}% of {r['ceiling']}"
            x = "-" if r["speedup_vs_baseline"] is None else f"{r['speedup_vs_baseline']:.1f}x vs {base}"
            g = gemm.get((r["shape"], r["dtype"]))
            g = "" if g is None else f", {100 * g / r['median_ms']:.0f}% of the Triton GEMM's rate"
            k = kernel.get((r["shape"], r["dtype"]))
            g += "" if k is None else f", kernel alone {k:.3f} ms"
            mem = "-" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:.0f} MB"
            print(f"  {ours} {r['shape']} {r['dtype']}: {r['median_ms']:.3f} ms, {pct}{g}, {x}, peak extra {mem}")
    for r in rows:
        if r["status"] != "ok":
            print(f"  NOT OK: {r['provider']} {r['shape']} {r['dtype']}: {r['status']} {r['check'] or r['notes']}")
EOF
    fi
    echo "results: $RESULTS"
}

finish() {
    local rc=$?
    trap - EXIT INT TERM
    if (( rc > 128 )); then
        SUMMARY+=("INTERRUPTED (signal $((rc - 128))): later steps did not run")
        FAILED=1
    fi
    if (( DRY_RUN )) || [[ -z ${OUT:-} ]]; then
        summary
    else  # one archive instead of a file per log: the return folder takes at most 8 files
        summary > "$RESULTS/summary.txt"
        mkdir -p "$OUT"
        cp "$RESULTS/summary.txt" "$OUT/summary.txt"
        tar -czf "$OUT/gpu_check.tar.gz" -C "$RESULTS" . 2>/dev/null \
            || echo "could not pack $RESULTS into $OUT/gpu_check.tar.gz" >> "$OUT/summary.txt"
        cat "$OUT/summary.txt"
    fi
    exit $(( FAILED ? 1 : 0 ))
}
STEP_PID=""
on_signal() {  # stop the running step (its own process group), then finish with the summary
    [[ -n $STEP_PID ]] && kill -TERM "$STEP_PID" 2>/dev/null
    exit "$1"
}
trap finish EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

selected() {  # NAME: true when GPU_CHECK_STEPS is unset or names it
    [[ -z ${GPU_CHECK_STEPS:-} || " $GPU_CHECK_STEPS " == *" $1 "* ]]
}

# step NAME LIMIT_S COMMAND...: runs with min(LIMIT, remaining budget), logs to RESULTS/NAME.log
step() {
    local name=$1 want=$2
    shift 2
    if ! selected "$name"; then
        SUMMARY+=("$name: not asked for (GPU_CHECK_STEPS)")
        return 0
    fi
    local left
    left=$(remaining)
    local limit=$(( want < left ? want : left ))
    if (( DRY_RUN )); then
        echo "$name: timeout ${want}s: $(printf '%q ' "$@")"
        SUMMARY+=("$name: would run (limit ${want}s)")
        return 0
    fi
    if (( limit < 15 )); then
        SUMMARY+=("$name: SKIPPED (out of time budget)")
        return 0
    fi
    echo "=== $name (timeout ${limit}s): $*"
    local began=$SECONDS
    # In the background with `wait`, so that a signal to this script runs its trap at once (bash
    # defers traps while a foreground command runs); `timeout` sits in a process group of its own,
    # so the trap forwards the signal to it. The log is shown as it grows.
    timeout --kill-after=10 "$limit" "$@" > "$RESULTS/$name.log" 2>&1 &
    STEP_PID=$!
    tail -n +1 -f --pid="$STEP_PID" "$RESULTS/$name.log" &
    local tail_pid=$!
    wait "$STEP_PID"
    local rc=$?
    wait "$tail_pid" 2>/dev/null
    STEP_PID=""
    local took=$((SECONDS - began))
    local tests=""
    # pytest's last line ("3 failed, 40 passed in 61.2s") says more than the exit status.
    if [[ $1 == "$PY" && ${2:-} == -m && ${3:-} == pytest ]]; then
        tests=$(grep -E "^(=+ )?[0-9]+ (passed|failed|error|skipped|deselected)" "$RESULTS/$name.log" | tail -n 1 | tr -d '=')
        tests=${tests:+: ${tests# }}
    fi
    if (( rc == 0 )); then
        SUMMARY+=("$name: ok (${took}s)$tests")
    elif (( rc == 124 || rc == 137 )); then
        SUMMARY+=("$name: TIMED OUT after ${took}s$tests (results up to the cut-off are in $RESULTS/$name.log)")
        FAILED=1
    else
        SUMMARY+=("$name: FAILED rc=$rc (${took}s)$tests, see $RESULTS/$name.log")
        FAILED=1
    fi
    return 0
}

# pytest with per-test results as they finish, failure details and a per-test deadline.
PYTEST=($PY -m pytest -v --tb=short -rfE -p no:cacheprovider -p _gpu_check_deadline
        -o "gpu_check_test_deadline=$TEST_DEADLINE_S")
if [[ -z ${GPU_CHECK_PYTEST_ARGS+set} ]]; then
    if (( ! DRY_RUN )) && $PY -c "import xdist" >/dev/null 2>&1; then GPU_CHECK_PYTEST_ARGS="-n 2"; else GPU_CHECK_PYTEST_ARGS=""; fi
fi
read -r -a EXTRA_PYTEST <<< "$GPU_CHECK_PYTEST_ARGS"
PYTEST+=("${EXTRA_PYTEST[@]}")
if (( ! DRY_RUN )); then
    cat > "$RESULTS/_gpu_check_deadline.py" <<'EOF'
"""Stop any one test after gpu_check_test_deadline seconds (SIGALRM; the main thread only)."""
import signal

import pytest


def pytest_addoption(parser):
    parser.addini("gpu_check_test_deadline", "seconds a single test may run (0: no limit)", default="0")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    limit = float(item.config.getini("gpu_check_test_deadline"))
    if limit <= 0:
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"{item.nodeid} ran past the per-test deadline of {limit:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
EOF
fi

# --- 0. what machine is this --------------------------------------------------------------------
if (( ! DRY_RUN )); then
    GPU_NAME=$($PY -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null || echo "no CUDA device")
    ARCH=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))" 2>/dev/null || echo "")
    VERSIONS=$($PY -c "import platform, torch; import importlib.util as u; t = __import__('triton').__version__ if u.find_spec('triton') else 'none'; print(f'python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {t}')" 2>/dev/null)
    echo "GPU: $GPU_NAME (sm $ARCH); $VERSIONS"
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
else
    echo "dry run: python '$PY', budget ${BUDGET_S}s, per-test deadline ${TEST_DEADLINE_S}s, results in $RESULTS"
fi

# --- 1. build the extension against the installed torch (CUDA kernels for this GPU only) -------
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [[ ${GPU_CHECK_SKIP_BUILD:-0} == 1 ]]; then  # reuse an extension already built for this torch
    SUMMARY+=("build: SKIPPED (GPU_CHECK_SKIP_BUILD=1)")
else
    step build 120 $PY -m pip install -v --no-build-isolation --no-deps --no-index -e .
fi
# The extension must load (with CUDA kernels when the checkout has CUDA sources) before the rest
# means anything.
NEED_CUDA_KERNELS=$(compgen -G "csrc/cuda/*.cu" >/dev/null && echo 1 || echo 0)
# An argument error must come back as a RuntimeError whose message holds its numbers: a static
# copy of libstdc++ in the extension crashes right there (setup.py's _shared_cxx_runtime).
step extension 20 $PY -c "
import deltakern.ops.extension as e, sys, torch
m = e.load()
cuda = bool(m and m.built_with_cuda())
print('deltakern._C loaded:', m is not None, '| CUDA kernels:', cuda, '|', e.unavailable_reason() or '')
if m is None or not (cuda or not $NEED_CUDA_KERNELS):
    sys.exit(1)
for device in ['cpu'] + (['cuda'] if cuda else []):
    args = [torch.randn(4, 8, device=device), torch.randn(3, 8, device=device), torch.tensor([0, 1, 2, 0], device=device)]
    try:
        torch.ops.deltakern.ebm_loss_forward(*args, 1e300, 0.0, 4, True, False, True)
        sys.exit(f'{device}: no error for inv_temp = 1e300')
    except RuntimeError as err:
        print(device, 'error message:', str(err).splitlines()[0])
        if 'got 1e+300' not in str(err):
            sys.exit(f'{device}: the number is missing from the message')"

# The GPU image has no open_clip and no network: install the wheels that
# bench/fetch_gpu_wheels.sh put in .gpu_wheels/ (carried along with the checkout) when present,
# before the tests are collected (tests/test_images.py and the pipeline step need it).
if (( ! DRY_RUN )) && [[ -d .gpu_wheels ]] && ! $PY -c "import open_clip" >/dev/null 2>&1; then
    $PY -m pip install --quiet --no-index --no-deps --find-links .gpu_wheels \
        open_clip_torch ftfy wcwidth regex tabulate pytorch-ood >/dev/null 2>&1 \
        || SUMMARY+=("wheels: could not install the wheels in .gpu_wheels")
fi

# --- 2. GPU tests, split so that one slow part cannot hide the others -------------------------
# Only files that can be collected here: a file importing a package this image lacks (scikit-learn,
# open_clip) would stop the whole collection; it is named instead.
collectable() {  # sets FILES to the collectable ones among "$@"; names the others in the summary
    FILES=()
    local f
    local rc
    for f in "$@"; do
        rc=0
        (( DRY_RUN )) || timeout 60 $PY -m pytest --collect-only -q -p no:cacheprovider "$f" >/dev/null 2>&1 || rc=$?
        if (( rc == 0 )); then
            FILES+=("$f")
        elif (( rc == 5 )); then  # pytest's "no tests collected": skipped at import (importorskip)
            SUMMARY+=("tests: $f has no tests here (a package it needs is missing: pytest --collect-only -rs $f)")
        else
            SUMMARY+=("tests: $f NOT COLLECTED here (rc=$rc; run: pytest --collect-only $f)")
        fi
    done
}
TRITON_FILES=(tests/test_triton_gpu.py)
LOSS_FILES=(tests/test_loss_gpu.py tests/test_ops_checks.py)
OTHER_FILES=()
for f in $(grep -l "mark.gpu" tests/test_*.py); do
    [[ " ${TRITON_FILES[*]} ${LOSS_FILES[*]} " == *" $f "* ]] || OTHER_FILES+=("$f")
done
run_tests() {  # NAME LIMIT MARK FILES...
    local name=$1 limit=$2 mark=$3
    shift 3
    if ! selected "$name"; then
        SUMMARY+=("$name: not asked for (GPU_CHECK_STEPS)")
        return 0
    fi
    collectable "$@"
    if (( ${#FILES[@]} )); then
        step "$name" "$limit" "${PYTEST[@]}" -m "$mark" "${FILES[@]}"
    else
        SUMMARY+=("$name: SKIPPED (no collectable test file)")
    fi
}
run_tests triton_tests 150 "gpu and not slow" "${TRITON_FILES[@]}"
run_tests loss_tests 50 "gpu and not slow" "${LOSS_FILES[@]}"
run_tests other_tests 30 "gpu and not slow" "${OTHER_FILES[@]}"

# --- 3. GPU scoring table (rows are saved after every case) -----------------------------------
step score_table 90 $PY bench/bench_gpu_score.py --k 1000 --dtype bfloat16 float32 --out "$RESULTS"

# --- 4. fused EBM loss fwd+bwd at B = 65,536 ---------------------------------------------------
step loss_bench 30 $PY bench/bench_loss.py --device cuda --shapes 65536x20000 --out "$RESULTS"

# --- 5. image pipeline throughput (synthetic images; needs open_clip, installed above) --------
if (( DRY_RUN )) || $PY -c "import open_clip" >/dev/null 2>&1; then
    step pipeline 30 $PY bench/bench_pipeline.py --device cuda --images 2048 --batch-size 256 --workers 8 --out "$RESULTS"
else
    SUMMARY+=("pipeline: SKIPPED (open_clip is not installed here)")
fi

# --- 6. opt-in: the heavy GPU tests (autotuning, Inductor, inputs past 2^31 elements) ---------
if [[ ${GPU_CHECK_HEAVY:-0} == 1 ]]; then
    run_tests heavy_tests 150 "gpu and slow" "${TRITON_FILES[@]}" "${LOSS_FILES[@]}" "${OTHER_FILES[@]}"
    run_tests bench_tests 90 "gpu" bench/test_bench_*.py
fi
if [[ ${GPU_CHECK_HEAVY:-0} == 1 || " ${GPU_CHECK_STEPS:-} " == *" tiles "* ]]; then
    step tiles 200 $PY bench/bench_gpu_tiles.py --out "$RESULTS"
fi
if [[ ${GPU_CHECK_HEAVY:-0} != 1 ]]; then
    SUMMARY+=("heavy_tests: not asked for (GPU_CHECK_HEAVY=1 runs the tests marked gpu and slow, and bench/test_bench_*.py on the GPU)")
fi
