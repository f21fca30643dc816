#!/usr/bin/env bash
# session 4 call 3: tensor-core depth stage + vectorised Delta: backward grid + sanitizers, bench, per-kernel times
set -u
T0=$(date +%s)
left() { echo $(( 570 - ($(date +%s) - T0) )); }
STAGES="build test sanitize" MODA_GPU_TEST_FILTER=backward TEST_TIMEOUT=380 bash bench/device_run.sh > $OUT/run.log 2>&1
grep -E "FAIL|ran|passed|failed|SUMMARY|rc=" $OUT/run.log | grep -v "^sampled" | head -30
cp $OUT/gpu_test.log $OUT/gpu_test_backward.log 2>/dev/null
echo "== left $(left) s"
B=./build-device/moda
if [ $(left) -gt 60 ]; then
  timeout 60 $B bench --device cuda --shapes S1,S2,S3,S4,S5 --nondeterministic --json $OUT/bench_nd.json > $OUT/bench_nd.log 2>&1; echo "bench nd rc=$?"
fi
if [ $(left) -gt 60 ]; then
  timeout 60 $B bench --device cuda --shapes S1,S2,S3,S4,S5 --json $OUT/bench_det.json > $OUT/bench_det.log 2>&1; echo "bench det rc=$?"
fi
if [ $(left) -gt 50 ]; then
  MODA_CUDA_BWD_NOTDC=1 timeout 40 $B bench --device cuda --shapes S1,S2,S5 --nondeterministic > $OUT/bench_nd_notdc.log 2>&1; echo "bench nd NOTDC rc=$?"
fi
for sh in S1 S2 S5; do
  [ $(left) -gt 40 ] || break
  timeout 35 ncu --clock-control none --metrics gpu__time_duration.sum,dram__bytes.sum --launch-skip 20 -c 5 \
      $B bench --device cuda --shapes $sh --reps 20 --nondeterministic > $OUT/ncu_times_$sh.log 2>&1
  echo "ncu $sh rc=$?"
  grep -E "^  [a-zA-Z_].*\(|gpu__time_duration|dram__bytes" $OUT/ncu_times_$sh.log | paste - - - | sed -E 's/\(bw_params\)|\(hop_params\)|<unnamed>:://g; s/, Context.*CC 9.0//; s/ +/ /g' | cut -c1-170
done
echo; echo "non-deterministic:"; grep -E "^\| (S|shape)" $OUT/bench_nd.log
echo "deterministic:"; grep -E "^\| S" $OUT/bench_det.log
echo "non-det, SIMT depth kernel (MODA_CUDA_BWD_NOTDC=1):"; grep -E "^\| S" $OUT/bench_nd_notdc.log
echo "== done at $(( $(date +%s) - T0 )) s"
