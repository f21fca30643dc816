#!/usr/bin/env bash
# session 6 call F, H100: the final trainer build (one-wave chunks, mg_grad_combine with its stride): the
# row-kernel test (full), the parity test, and memcheck + racecheck of the row-kernel test and of the parity
# test's quick form (its gradient check runs every trainer kernel), side by side.
set -u
T0=$(date +%s)
export MODA_GIT_COMMIT=${COMMIT:-unknown}
OUT=$OUT/train STAGES="build parity" bash experiments/device_train.sh > $OUT/train.log 2>&1; echo "build+parity rc=$? at $(( $(date +%s) - T0 )) s"
M=/tmp/moda_build_model
cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
pids=""
for t in gpu_test_model_kernels gpu_test_model_gpu; do
    for tool in memcheck racecheck; do
        MODA_TEST_QUICK=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=4 timeout 300 $cs --tool $tool --error-exitcode 99 $M/$t > $OUT/cs_${t}_$tool.log 2>&1 &
        pids="$pids $!"
    done
done
for p in $pids; do wait $p; echo "sanitizer rc=$?"; done
echo "== done at $(( $(date +%s) - T0 )) s"
grep -E "rc=|passed|failed" $OUT/train/summary.txt
for f in $OUT/cs_*.log; do echo "$(basename $f): $(grep -E 'passed|failed' $f | tail -1) | $(grep -E 'SUMMARY' $f | tail -1)"; done
