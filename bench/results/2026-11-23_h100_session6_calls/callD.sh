#!/usr/bin/env bash
# session 6 call D, H100: the row-kernel test in its final, wider form (swiglu, in-place and misaligned calls,
# guard regions, per-element bounds scaled by the terms' magnitudes) on the current kernels, on f9a95ca's kernels
# (it must fail there only on the no-norm padded-output scalar case), and under memcheck + racecheck (quick).
set -u
T0=$(date +%s)
export MODA_GIT_COMMIT=${COMMIT:-unknown}
rm -rf /tmp/oldtree && mkdir -p /tmp/oldtree && tar --exclude=./build-device --exclude=./.staged -cf - . | tar -xf - -C /tmp/oldtree
cp .staged/gpu_kernels_f9a95ca.cu /tmp/oldtree/src/model/cuda/gpu_kernels.cu
( OUT=$OUT/new STAGES=build bash experiments/device_train.sh > $OUT/new_build.log 2>&1; echo "model build rc=$?" ) &
( cd /tmp/oldtree && OUT=$OUT/old BUILD=/tmp/moda_build_old STAGES=build bash experiments/device_train.sh > $OUT/old_build.log 2>&1; echo "old model build rc=$?" ) &
wait
echo "== builds done at $(( $(date +%s) - T0 )) s"
M=/tmp/moda_build_model
timeout 120 $M/gpu_test_model_kernels > $OUT/kernels_new.log 2>&1; echo "row-kernel test rc=$? at $(( $(date +%s) - T0 )) s"
timeout 120 /tmp/moda_build_old/gpu_test_model_kernels > $OUT/kernels_old.log 2>&1; echo "on the old kernels rc=$? at $(( $(date +%s) - T0 )) s"
cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck; do
    MODA_TEST_QUICK=1 timeout 240 $cs --tool $tool --error-exitcode 99 $M/gpu_test_model_kernels > $OUT/cs_$tool.log 2>&1 &
    eval "pid_$tool=\$!"
done
for tool in memcheck racecheck; do eval "wait \$pid_$tool"; echo "$tool rc=$? at $(( $(date +%s) - T0 )) s"; tail -2 $OUT/cs_$tool.log; done
grep -vE "^  " $OUT/kernels_new.log | tail -12
echo "old:"; grep -E "FAIL" $OUT/kernels_old.log | cut -c1-220 | head -6; tail -1 $OUT/kernels_old.log
(cd $OUT && tar czf /tmp/all.tgz . && rm -rf $OUT/* && mv /tmp/all.tgz $OUT/)
echo "== done at $(( $(date +%s) - T0 )) s"
