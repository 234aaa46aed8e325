# The second H200 run (from the repository root, with this folder copied to out/diag; the
# program was then named repro.py).
# Follow-up GPU run: the loss and other GPU tests (crash-isolated), the error repro variants, a
# backtrace of the crash, then the tile sweep with what is left of the time.
export PYTHONUNBUFFERED=1
T0=$SECONDS
OUT=$OUT/a GPU_CHECK_RESULTS=out/a GPU_CHECK_BUDGET_S=170 GPU_CHECK_STEPS="build extension loss_tests other_tests" bash bench/gpu_check.sh > /dev/null 2>&1
for v in cpu_inv_temp cuda_inv_temp cuda_inv_temp_default_op cuda_inv_temp_no_grad cuda_shape cuda_device_mix cuda_mask_count cuda_torch_error cuda_nonfinite_row cuda_backward_bad cuda_score_bad; do
  timeout 25 python3 out/diag/error_repro.py $v 2>&1 | grep -v "^  File\|^Extension modules\|^$" | head -8; echo "$v rc=${PIPESTATUS[0]}"
done > $OUT/diag.txt 2>&1
timeout 60 cuda-gdb -q -batch -ex "set pagination off" -ex run -ex bt --args python3 out/diag/error_repro.py cuda_inv_temp > $OUT/gdb.txt 2>&1
LEFT=$(( 415 - (SECONDS - T0) ))
echo "tiles budget ${LEFT}s" >> $OUT/diag.txt
OUT=$OUT/b GPU_CHECK_RESULTS=out/b GPU_CHECK_BUDGET_S=$LEFT GPU_CHECK_STEPS="tiles" bash bench/gpu_check.sh > /dev/null 2>&1
cat $OUT/a/summary.txt $OUT/diag.txt $OUT/b/summary.txt; tail -40 $OUT/gdb.txt | grep -E "^#|signal|SIGSEGV" | head -30
sed -n "/^NVIDIA/,\$p" out/b/tiles.log | grep -v "^  " | head -70
