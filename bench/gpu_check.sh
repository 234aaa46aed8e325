#!/usr/bin/env bash
# The single GPU check (docs/architecture.md §6), for a bare CUDA machine with PyTorch, Triton, pytest and
# numpy preinstalled and no network. Run from the repository root:
#
#     bash bench/gpu_check.sh            # results under $OUT if set, else out/gpu_check
#
# Before: on a machine with PyPI, `bash bench/fetch_gpu_wheels.sh` (open_clip wheels for the GPU
# image, into the git-ignored .gpu_wheels/, which must travel with the checkout).
# Steps: build the extension against the installed torch; run the GPU tests; the GPU scoring
# table (Triton vs eager vs torch.compile vs torch.mm); the fused EBM loss at B = 65,536; the
# image pipeline's throughput (only when open_clip is importable). Each step has its own
# timeout and the whole script stays under a 6-minute budget: a step that would not fit is
# skipped and says so. Failures do not stop later steps; a short summary is printed last and
# the exit status is non-zero when any step failed.
set -u

BUDGET_S=${GPU_CHECK_BUDGET_S:-345}  # leaves headroom under 6 minutes for start-up and summary
RESULTS=${OUT:-out/gpu_check}
PY=${PYTHON:-python}
mkdir -p "$RESULTS"
# deltakern imports from the checkout even if the editable install below fails (the reference and
# Triton backends need no compiled code), so later steps still report something useful.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS
declare -a SUMMARY=()
FAILED=0

remaining() { echo $((BUDGET_S - (SECONDS - START))); }

# step NAME DEFAULT_TIMEOUT_S COMMAND...: runs with min(DEFAULT, remaining budget), logs to RESULTS/NAME.log
step() {
    local name=$1 want=$2
    shift 2
    local left
    left=$(remaining)
    local limit=$(( want < left ? want : left ))
    if (( limit < 15 )); then
        SUMMARY+=("$name: SKIPPED (out of time budget)")
        return 0
    fi
    echo "=== $name (timeout ${limit}s): $*"
    local began=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
    local rc=${PIPESTATUS[0]}
    local took=$((SECONDS - began))
    if (( rc == 0 )); then
        SUMMARY+=("$name: ok (${took}s)")
    elif (( rc == 124 || rc == 137 )); then
        SUMMARY+=("$name: TIMED OUT after ${took}s (partial results kept)")
        FAILED=1
    else
        SUMMARY+=("$name: FAILED rc=$rc (${took}s, see $RESULTS/$name.log)")
        FAILED=1
    fi
    return 0
}

# --- 0. what machine is this --------------------------------------------------------------------
GPU_NAME=$($PY -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null || echo "no CUDA device")
ARCH=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))" 2>/dev/null || echo "")
VERSIONS=$($PY -c "import platform, torch; import importlib.util as u; t = __import__('triton').__version__ if u.find_spec('triton') else 'none'; print(f'python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {t}')" 2>/dev/null)
echo "GPU: $GPU_NAME (sm $ARCH); $VERSIONS"

# --- 1. build the extension against the installed torch (CUDA kernels for this GPU only) -------
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [[ ${GPU_CHECK_SKIP_BUILD:-0} == 1 ]]; then  # reuse an extension already built for this torch
    SUMMARY+=("build: SKIPPED (GPU_CHECK_SKIP_BUILD=1)")
else
    step build 170 $PY -m pip install --no-build-isolation --no-deps --no-index -e .
fi
# The extension must load (with CUDA kernels when the checkout has CUDA sources) before the rest
# means anything.
NEED_CUDA_KERNELS=$(compgen -G "csrc/cuda/*.cu" >/dev/null && echo 1 || echo 0)
step extension 30 $PY -c "
import deltakern.ops.extension as e, sys
m = e.load()
cuda = bool(m and m.built_with_cuda())
print('deltakern._C loaded:', m is not None, '| CUDA kernels:', cuda, '|', e.unavailable_reason() or '')
sys.exit(0 if m is not None and (cuda or not $NEED_CUDA_KERNELS) else 1)"

# --- 2. GPU tests ---------------------------------------------------------------------------
# Only the files that hold GPU tests and can be collected here: a file importing a package this
# image lacks (scikit-learn, open_clip) would stop the whole collection; it is named instead.
GPU_TEST_FILES=()
for f in $(grep -l "mark.gpu" tests/test_*.py); do
    if timeout 60 $PY -m pytest --collect-only -q -p no:cacheprovider "$f" >/dev/null 2>&1; then
        GPU_TEST_FILES+=("$f")
    else
        SUMMARY+=("gpu_tests: $f NOT COLLECTED here (missing package? run: pytest --collect-only $f)")
    fi
done
if (( ${#GPU_TEST_FILES[@]} )); then
    step gpu_tests 100 $PY -m pytest -m gpu "${GPU_TEST_FILES[@]}" -q -p no:cacheprovider
else
    SUMMARY+=("gpu_tests: SKIPPED (no test file has a gpu mark)")
fi

# --- 3. GPU scoring table (the headline shape first; rows are saved after every case) --------
step score_table 150 $PY bench/bench_gpu_score.py --k 1000 20000 10 --dtype bfloat16 float32 --out "$RESULTS"

# --- 4. fused EBM loss fwd+bwd at B = 65,536 (and the two CPU shapes on the GPU) --------------
step loss 50 $PY bench/bench_loss.py --device cuda --shapes 65536x20000 4096x20000 --out "$RESULTS"

# --- 5. image pipeline throughput (synthetic images; needs open_clip) -------------------------
# The GPU image has no open_clip and no network: install the wheels that
# bench/fetch_gpu_wheels.sh put in .gpu_wheels/ (carried along with the checkout) when present.
if [[ -d .gpu_wheels ]] && ! $PY -c "import open_clip" >/dev/null 2>&1; then
    $PY -m pip install --quiet --no-index --no-deps --find-links .gpu_wheels \
        open_clip_torch ftfy wcwidth regex tabulate >/dev/null 2>&1 \
        || SUMMARY+=("pipeline: could not install the wheels in .gpu_wheels")
fi
if $PY -c "import open_clip" >/dev/null 2>&1; then
    step pipeline 45 $PY bench/bench_pipeline.py --device cuda --images 2048 --batch-size 256 --workers 8 --out "$RESULTS"
else
    SUMMARY+=("pipeline: SKIPPED (open_clip is not installed here)")
fi

# --- summary (last) -------------------------------------------------------------------------
echo
echo "================ gpu_check summary ================"
echo "GPU: $GPU_NAME; $VERSIONS; commit $(git rev-parse --short=12 HEAD 2>/dev/null || echo '?'); $((SECONDS - START))s"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
$PY - "$RESULTS" <<'EOF' 2>/dev/null || true
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name, ours, base in (("gpu_score.json", "deltakern-triton", "eager"), ("loss_cuda.json", "deltakern-fused", "autograd-reference")):
    path = out / name
    if not path.exists():
        continue
    rows = json.loads(path.read_text())["rows"]
    for r in rows:
        if r["provider"] == ours and r["status"] == "ok":
            pct = "-" if r["pct_of_ceiling"] is None else f"{r['pct_of_ceiling']:.0f}% of {r['ceiling']}"
            x = "-" if r["speedup_vs_baseline"] is None else f"{r['speedup_vs_baseline']:.1f}x vs {base}"
            mem = "-" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:.0f} MB"
            print(f"  {ours} {r['shape']} {r['dtype']}: {r['median_ms']:.3f} ms, {pct}, {x}, peak extra {mem}")
    bad = [f"{r['provider']} {r['shape']} {r['dtype']}: {r['status']} {r['check'] or r['notes']}" for r in rows if r["status"] != "ok"]
    for line in bad:
        print(f"  NOT OK: {line}")
EOF
echo "results: $RESULTS"
exit $FAILED
