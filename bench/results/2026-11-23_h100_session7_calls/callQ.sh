#!/usr/bin/env bash
# session 7 call Q, H100: the final tree (call O plus the key-range depth mask):
#  1. library and trainer builds side by side;
#  2. the forward GPU grid (both paths), then memcheck + racecheck of its quick grid;
#  3. moda bench S1-S5 (forward and non-deterministic forward + backward), then compare_sdpa (cuDNN, FA2) on
#     S1, S2, S5 in the same call;
#  4. the trainer's GPU-vs-CPU parity test and row-kernel test (the trainer's attention forward takes this kernel).
set -u
T0=$(date +%s)
export MODA_GIT_COMMIT=${COMMIT:-unknown}
el() { echo "$(( $(date +%s) - T0 )) s"; }
( OUT=$OUT/lib STAGES=build bash bench/device_run.sh > $OUT/lib_build.log 2>&1; echo "lib build rc=$? at $(el)" ) &
( OUT=$OUT/train STAGES=build bash experiments/device_train.sh > $OUT/train_build.log 2>&1; echo "trainer build rc=$? at $(el)" ) &
wait
t=build-device/gpu_test_forward
timeout 200 $t > $OUT/gpu_forward.log 2>&1; echo "forward grid rc=$? at $(el): $(grep -E '^gpu_test_forward:' $OUT/gpu_forward.log | tail -1)"
cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck; do
    MODA_TEST_QUICK=1 timeout 150 $cs --tool $tool --error-exitcode 99 $t > $OUT/cs_forward_$tool.log 2>&1 &
done
wait
for tool in memcheck racecheck; do echo "$tool: $(grep -E 'passed|failed' $OUT/cs_forward_$tool.log | tail -1) | $(grep SUMMARY $OUT/cs_forward_$tool.log | tail -1)"; done
OUT=$OUT/bench STAGES="bench sdpa" BENCH_SHAPES=S1,S2,S3,S4,S5 BENCH_ARGS=--nondeterministic bash bench/device_run.sh > $OUT/bench_stage.log 2>&1; echo "bench+sdpa rc=$? at $(el)"
OUT=$OUT/train STAGES=parity bash experiments/device_train.sh > $OUT/train_parity.log 2>&1; echo "trainer parity rc=$? at $(el)"
echo "== done at $(el)"
grep -E "passed|failed" $OUT/train/summary.txt
grep -E "grid with|S[2-5].*sampled" $OUT/gpu_forward.log
tail -22 $OUT/bench_stage.log
