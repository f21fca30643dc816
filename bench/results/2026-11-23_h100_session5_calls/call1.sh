#!/usr/bin/env bash
# session 5 call 1 (tree 9e691b6): issue 4's acceptance in one call.
#  1. build the library+tests and the trainer side by side;
#  2. timings on a quiet GPU: moda bench fwd+bwd (non-det., det.) and compare_sdpa fwd+bwd (FA2, cuDNN) on
#     S1-S5 in the same run, S6 forward against SDPA, the trainer's f32 depth gradients on the warp kernel
#     (default) and on the tensor-core one (MODA_CUDA_BWD_TDC_F32=1) with the depth-free rows beside them;
#  3. the full backward grid (with the TDC_F32 and NOTDC checks) and memcheck + racecheck of its quick grid,
#     the three side by side, with the rest of the call's time.
set -u
T0=$(date +%s)
left() { echo $(( 580 - ($(date +%s) - T0) )); }
export MODA_GIT_COMMIT=9e691b6
B=build-device
( STAGES=build bash bench/device_run.sh > $OUT/lib_build.log 2>&1; echo "lib build rc=$?" ) &
( OUT=$OUT/train STAGES=build bash experiments/device_train.sh > $OUT/train_build.log 2>&1; echo "model build rc=$?" ) &
wait
echo "== builds done at $(( $(date +%s) - T0 )) s"
timeout 40 $B/moda bench --device cuda --shapes S1,S2,S3,S4,S5 --nondeterministic --json $OUT/bench_nd.json > $OUT/bench_nd.log 2>&1; echo "bench nd rc=$?"
timeout 40 $B/moda bench --device cuda --shapes S1,S2,S3,S4,S5 --json $OUT/bench_det.json > $OUT/bench_det.log 2>&1; echo "bench det rc=$?"
PYTHONUNBUFFERED=1 PYTHONPATH=python MODA_LIBRARY="$PWD/$B/libmoda.so" timeout 80 python3 bench/compare_sdpa.py \
    --lib $B/libmoda.so --shapes S1,S2,S3,S4,S5 --json $OUT/sdpa.json > $OUT/sdpa.log 2>&1; echo "sdpa rc=$?"
timeout 30 $B/moda bench --device cuda --shapes S6 --no-backward --json $OUT/bench_s6.json > $OUT/bench_s6.log 2>&1; echo "bench S6 rc=$?"
PYTHONUNBUFFERED=1 PYTHONPATH=python MODA_LIBRARY="$PWD/$B/libmoda.so" timeout 40 python3 bench/compare_sdpa.py \
    --lib $B/libmoda.so --shapes S6 --no-backward --json $OUT/sdpa_s6.json > $OUT/sdpa_s6.log 2>&1; echo "sdpa S6 rc=$?"
echo "== timings 1 done at $(( $(date +%s) - T0 )) s"
OUT=$OUT/train STAGES=speed SPEED_STEPS=4 SPEED_CONFIGS="d384_T1024_none_nd d384_T1024_attnffn_nd d384_T4096_none_nd d384_T4096_attnffn_nd" \
    timeout 90 bash experiments/device_train.sh > $OUT/train_speed.log 2>&1; echo "train speed rc=$?"
mkdir -p $OUT/train_tdc
MODA_CUDA_BWD_TDC_F32=1 OUT=$OUT/train_tdc STAGES=speed SPEED_STEPS=4 SPEED_CONFIGS="d384_T1024_attnffn_nd d384_T4096_attnffn_nd" \
    timeout 45 bash experiments/device_train.sh > $OUT/train_speed_tdc.log 2>&1; echo "train speed tdc rc=$?"
echo "== timings done at $(( $(date +%s) - T0 )) s, left $(left) s"
cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck; do
    MODA_TEST_QUICK=1 timeout $(( $(left) - 25 )) $cs --tool $tool --error-exitcode 99 $B/gpu_test_backward > $OUT/cs_$tool.log 2>&1 &
    eval "pid_$tool=\$!"
done
timeout $(( $(left) - 25 )) $B/gpu_test_backward > $OUT/gpu_test_backward.log 2>&1; echo "backward grid rc=$? at $(( $(date +%s) - T0 )) s"
for tool in memcheck racecheck; do eval "wait \$pid_$tool"; echo "$tool rc=$? at $(( $(date +%s) - T0 )) s"; tail -2 $OUT/cs_$tool.log; done
echo; grep -E "passed|failed|FAIL" $OUT/gpu_test_backward.log | tail -8
grep -E "FAIL" $OUT/cs_*.log | head -5
echo; echo "non-deterministic:"; grep -E "^\| (S|shape)" $OUT/bench_nd.log
echo "deterministic:"; grep -E "^\| S" $OUT/bench_det.log
echo "S6:"; grep -E "^\| S" $OUT/bench_s6.log; tail -4 $OUT/sdpa_s6.log
echo "sdpa:"; tail -14 $OUT/sdpa.log
echo "trainer:"; cat $OUT/train/summary.txt | cut -c1-240; echo "tdc f32:"; cat $OUT/train_tdc/summary.txt | cut -c1-240
(cd $OUT && tar czf /tmp/all.tgz . && rm -rf $OUT/* && mv /tmp/all.tgz $OUT/)
echo "== done at $(( $(date +%s) - T0 )) s"
