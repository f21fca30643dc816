#!/usr/bin/env bash
# session 6 call C, H100 (commit 50190ff): are the rewritten row kernels bitwise-neutral for the trainer? The
# parity test (its printed gradient errors, 20-step losses and checkpoint round trips) on the current tree and on
# the same tree with f9a95ca's gpu_kernels.cu, and the quick backward grid of the tree with the overlap draft
# removed (its sources are those of 9e691b6, which passed the full grid in session 5).
set -u
T0=$(date +%s)
export MODA_GIT_COMMIT=${COMMIT:-unknown}
B=build-device
rm -rf /tmp/oldtree && mkdir -p /tmp/oldtree && tar --exclude=./build-device --exclude=./.staged -cf - . | tar -xf - -C /tmp/oldtree
cp .staged/gpu_kernels_f9a95ca.cu /tmp/oldtree/src/model/cuda/gpu_kernels.cu
( STAGES=build bash bench/device_run.sh > $OUT/lib_build.log 2>&1; echo "lib build rc=$?" ) &
( OUT=$OUT/new STAGES=build bash experiments/device_train.sh > $OUT/new_build.log 2>&1; echo "model build rc=$?" ) &
( cd /tmp/oldtree && OUT=$OUT/old BUILD=/tmp/moda_build_old STAGES=build bash experiments/device_train.sh > $OUT/old_build.log 2>&1; echo "old model build rc=$?" ) &
wait
echo "== builds done at $(( $(date +%s) - T0 )) s"
( OUT=$OUT/new STAGES=parity bash experiments/device_train.sh > $OUT/new_parity.log 2>&1; echo "new parity rc=$?" )
( cd /tmp/oldtree && OUT=$OUT/old BUILD=/tmp/moda_build_old STAGES=parity bash experiments/device_train.sh > $OUT/old_parity.log 2>&1; echo "old parity rc=$?" )
MODA_TEST_QUICK=1 timeout 200 $B/gpu_test_backward > $OUT/gpu_test_backward_quick.log 2>&1; echo "quick backward grid rc=$? at $(( $(date +%s) - T0 )) s"
grep -E "passed|failed|ran [0-9]+ of" $OUT/gpu_test_backward_quick.log | tail -6
for v in new old; do grep -E "gradients|train |checkpoint" $OUT/$v/parity.log | sed 's/^ *//' > $OUT/${v}_parity_lines.txt; done
if cmp -s $OUT/new_parity_lines.txt $OUT/old_parity_lines.txt; then echo "parity output: IDENTICAL between old and new row kernels"; else echo "parity output differs:"; diff $OUT/old_parity_lines.txt $OUT/new_parity_lines.txt; fi
grep -hE "passed|failed" $OUT/new/summary.txt $OUT/old/summary.txt
(cd $OUT && tar czf /tmp/all.tgz . && rm -rf $OUT/* && mv /tmp/all.tgz $OUT/)
echo "== done at $(( $(date +%s) - T0 )) s"
