#!/usr/bin/env bash
# session 7 call J, H100: MODA_HOPPER_DEPTH_PRODUCER (dprod: at d = 64 the producer warpgroup's three idle warps
# load the consumer warps' depth sub-tiles, cp.async completing on per-buffer mbarriers) against the shipped code:
#  1. base and dprod, each its own libmoda.so, the same bench binary, base first and last;
#  2. cuDNN / FA2 sequence-only forward in the same call (compare_sdpa.py on the base library);
#  3. the forward GPU grid (both paths) on a dprod build, then memcheck + racecheck of its quick grid.
set -u
T0=$(date +%s)
export MODA_GIT_COMMIT=${COMMIT:-unknown}
el() { echo "$(( $(date +%s) - T0 )) s"; }
( cmake -S . -B build-dp -DCMAKE_BUILD_TYPE=Release -DMODA_BUILD_MODEL=OFF -DCMAKE_CUDA_ARCHITECTURES=90a \
    "-DCMAKE_CUDA_FLAGS=-DMODA_HOPPER_DEPTH_PRODUCER=1" \
    && cmake --build build-dp -j6 --target gpu_test_forward ) > $OUT/build_dp.log 2>&1 &
bqpid=$!
STAGES=variants VARIANT_ENV=MODA_CUDA_FORWARD=auto BENCH_SHAPES=S1,S2,S3,S4,S5,S1n,S2n \
    VARIANTS="dprod=-DMODA_HOPPER_DEPTH_PRODUCER=1" \
    OUT=$OUT/var bash bench/device_run.sh > $OUT/variants_stage.log 2>&1; echo "variants rc=$? at $(el)"
wait $bqpid; echo "dp build rc=$? at $(el)"
BUILD_DIR=build-var-base STAGES=sdpa BENCH_SHAPES=S1,S2,S5 SDPA_ARGS=--no-backward OUT=$OUT/sdpa bash bench/device_run.sh > $OUT/sdpa_stage.log 2>&1; echo "sdpa rc=$? at $(el)"
t=build-dp/gpu_test_forward
timeout 200 $t > $OUT/gpu_forward_dp.log 2>&1; echo "forward grid (dprod) rc=$? at $(el): $(grep -E 'passed|failed' $OUT/gpu_forward_dp.log | tail -2 | tr '\n' ' ')"
cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
left=$(( 580 - $(date +%s) + T0 ))
for tool in memcheck racecheck; do
    MODA_TEST_QUICK=1 timeout $left $cs --tool $tool --error-exitcode 99 $t > $OUT/cs_forward_dp_$tool.log 2>&1 &
done
wait
for tool in memcheck racecheck; do echo "$tool: $(grep -E 'passed|failed' $OUT/cs_forward_dp_$tool.log | tail -1) | $(grep SUMMARY $OUT/cs_forward_dp_$tool.log | tail -1)"; done
echo "== done at $(el)"
cat $OUT/var/variants_short.txt
grep -E "^\| S|ours|cuDNN|FA2" $OUT/sdpa/sdpa.log | head -12
cd $OUT && tar czf callJ_logs.tgz var sdpa *.log 2>/dev/null && rm -rf var/build_var_*.log
