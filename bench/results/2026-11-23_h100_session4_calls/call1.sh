#!/usr/bin/env bash
# session 4 call 1: backward grid + sanitizers (dK/dV form asked for), forward grid (new cases), per-kernel times
set -u
T0=$(date +%s)
left() { echo $(( 560 - ($(date +%s) - T0) )); }
STAGES="build test sanitize" MODA_GPU_TEST_FILTER=backward TEST_TIMEOUT=400 bash bench/device_run.sh
cp $OUT/gpu_test.log $OUT/gpu_test_backward.log
grep -E "hopper|dkdv|ran" $OUT/gpu_test_backward.log | head -20
echo "== left $(left) s"
if [ $(left) -gt 150 ]; then
  MODA_TEST_QUICK=1 timeout $(( $(left) - 90 )) ./build-device/gpu_test_forward > $OUT/gpu_test_forward_quick.log 2>&1
  echo "forward quick rc=$?"; tail -3 $OUT/gpu_test_forward_quick.log
fi
echo "== left $(left) s"
if [ $(left) -gt 60 ]; then
  for sh in S1 S2; do
    timeout 40 ncu --clock-control none --metrics gpu__time_duration.sum --launch-skip 20 -c 20 \
      ./build-device/moda bench --device cuda --shapes $sh --reps 20 --nondeterministic > $OUT/ncu_times_$sh.log 2>&1
    echo "ncu $sh rc=$?"
    grep -E "^  [a-zA-Z_].*\(|gpu__time_duration" $OUT/ncu_times_$sh.log | paste - - | sed -E 's/\(bw_params\)|\(hop_params\)//; s/ +/ /g' | awk '{print $0}' | cut -c1-160 | head -30
  done
fi
echo "== done at $(( $(date +%s) - T0 )) s"
