#!/usr/bin/env bash
# session 7 call R, H100: MODA_HOPPER_DEPTH_VOTE (vote: a depth sub-tile rescales the accumulators only when some
# alpha of the warp is not exactly 1) against the shipped code; then the forward GPU grid (both paths) on a vote
# build, and memcheck + racecheck of its quick grid.
set -u
T0=$(date +%s)
export MODA_GIT_COMMIT=${COMMIT:-unknown}
el() { echo "$(( $(date +%s) - T0 )) s"; }
( cmake -S . -B build-v -DCMAKE_BUILD_TYPE=Release -DMODA_BUILD_MODEL=OFF -DCMAKE_CUDA_ARCHITECTURES=90a "-DCMAKE_CUDA_FLAGS=-DMODA_HOPPER_DEPTH_VOTE=1" \
    && cmake --build build-v -j6 --target gpu_test_forward ) > $OUT/build_p.log 2>&1 &
bpid=$!
STAGES=variants VARIANT_ENV=MODA_CUDA_FORWARD=auto BENCH_SHAPES=S1,S2,S3,S4,S5 \
    VARIANTS="vote=-DMODA_HOPPER_DEPTH_VOTE=1" \
    OUT=$OUT/var bash bench/device_run.sh > $OUT/variants_stage.log 2>&1; echo "variants rc=$? at $(el)"
wait $bpid; echo "test build rc=$? at $(el)"
t=build-v/gpu_test_forward
timeout 200 $t > $OUT/gpu_forward.log 2>&1; echo "forward grid rc=$? at $(el): $(grep -E '^gpu_test_forward:' $OUT/gpu_forward.log | tail -1)"
cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck; do
    MODA_TEST_QUICK=1 timeout 150 $cs --tool $tool --error-exitcode 99 $t > $OUT/cs_forward_$tool.log 2>&1 &
done
wait
for tool in memcheck racecheck; do echo "$tool: $(grep -E 'passed|failed' $OUT/cs_forward_$tool.log | tail -1) | $(grep SUMMARY $OUT/cs_forward_$tool.log | tail -1)"; done
echo "== done at $(el)"
grep -E "grid with|FAIL" $OUT/gpu_forward.log
cat $OUT/var/variants_short.txt
cd $OUT && tar czf callR_logs.tgz var *.log 2>/dev/null && rm -rf var/build_var_*.log
