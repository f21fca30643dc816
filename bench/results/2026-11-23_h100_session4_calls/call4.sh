#!/usr/bin/env bash
# session 4 call 4 (final validation): backward grid + sanitizers, bench, trainer parity + speed, python GPU tests
set -u
T0=$(date +%s)
left() { echo $(( 575 - ($(date +%s) - T0) )); }
STAGES="build test sanitize" MODA_GPU_TEST_FILTER=backward TEST_TIMEOUT=330 bash bench/device_run.sh > $OUT/run.log 2>&1
grep -E "FAIL|ran|passed|failed|SUMMARY|rc=" $OUT/run.log | grep -v "^sampled" | head -24
cp $OUT/gpu_test.log $OUT/gpu_test_backward.log 2>/dev/null
echo "== left $(left) s"
B=./build-device/moda
timeout 50 $B bench --device cuda --shapes S1,S2,S3,S4,S5 --nondeterministic --json $OUT/bench_nd.json > $OUT/bench_nd.log 2>&1; echo "bench nd rc=$?"
timeout 50 $B bench --device cuda --shapes S1,S2,S3,S4,S5 --json $OUT/bench_det.json > $OUT/bench_det.log 2>&1; echo "bench det rc=$?"
echo "== left $(left) s"
mkdir -p $OUT/train
OUT=$OUT/train STAGES="build parity speed" SPEED_STEPS=4 SPEED_CONFIGS="d384_T4096_none_nd d384_T4096_attnffn_nd d384_T1024_none_nd d384_T1024_attnffn_nd d384_T1024_attnffn d768_T1024_none_nd" \
  timeout $(( $(left) - 60 )) bash experiments/device_train.sh > $OUT/train_run.log 2>&1
echo "train rc=$?"; cat $OUT/train/summary.txt | cut -c1-260
echo "== left $(left) s"
if [ $(left) -gt 55 ]; then
  MODA_FAST_PATHS=1 MODA_LIBRARY="$PWD/build-device/libmoda.so" PYTHONPATH=python timeout $(( $(left) - 10 )) \
    bash python/tests/run_gpu_tests.sh -q > $OUT/pytest_gpu_fast.log 2>&1
  echo "pytest (MODA_FAST_PATHS=1) rc=$?"; grep -E "FAILED|ERROR|passed|failed" $OUT/pytest_gpu_fast.log | tail -8
fi
for sh in S1 S2; do
  [ $(left) -gt 25 ] || break
  timeout 20 ncu --clock-control none --metrics gpu__time_duration.sum,dram__bytes.sum -k regex:tdc -c 1 \
      $B bench --device cuda --shapes $sh --reps 20 --nondeterministic > $OUT/ncu_tdc_$sh.log 2>&1
  echo "ncu $sh rc=$?"; grep -E "gpu__time_duration|dram__bytes" $OUT/ncu_tdc_$sh.log
done
echo; echo "non-deterministic:"; grep -E "^\| (S|shape)" $OUT/bench_nd.log
echo "deterministic:"; grep -E "^\| S" $OUT/bench_det.log
rm -rf $OUT/train/smoke
(cd $OUT && tar czf /tmp/all.tgz . && rm -rf $OUT/* && mv /tmp/all.tgz $OUT/)
echo "== done at $(( $(date +%s) - T0 )) s"
