#!/usr/bin/env bash
# session 7 call I, H100: the forward's depth-part variants (forward_hopper.cu, off by default):
#   borrow = MODA_HOPPER_DEPTH_BORROW (d = 64: 4 depth sub-tiles in flight per warp, two in borrowed ring stages),
#   qreg   = MODA_HOPPER_DEPTH_QREG (the warp's Q fragments in registers through the depth part), bq = both;
#  1. every variant its own libmoda.so, the same bench binary, base first and last (bench/device_run.sh variants);
#  2. cuDNN / FA2 sequence-only forward in the same call (compare_sdpa.py, base library);
#  3. the forward GPU grid (both paths) on a build with both variants on, then memcheck + racecheck of its quick grid.
set -u
T0=$(date +%s)
export MODA_GIT_COMMIT=${COMMIT:-unknown}
el() { echo "$(( $(date +%s) - T0 )) s"; }
( cmake -S . -B build-bq -DCMAKE_BUILD_TYPE=Release -DMODA_BUILD_MODEL=OFF -DCMAKE_CUDA_ARCHITECTURES=90a \
    "-DCMAKE_CUDA_FLAGS=-DMODA_HOPPER_DEPTH_BORROW=1 -DMODA_HOPPER_DEPTH_QREG=1" \
    && cmake --build build-bq -j6 --target gpu_test_forward ) > $OUT/build_bq.log 2>&1 &
bqpid=$!
STAGES=variants VARIANT_ENV=MODA_CUDA_FORWARD=auto BENCH_SHAPES=S1,S2,S3,S4,S5,S1n,S2n \
    VARIANTS="borrow=-DMODA_HOPPER_DEPTH_BORROW=1 qreg=-DMODA_HOPPER_DEPTH_QREG=1 bq=-DMODA_HOPPER_DEPTH_BORROW=1+-DMODA_HOPPER_DEPTH_QREG=1" \
    OUT=$OUT/var bash bench/device_run.sh > $OUT/variants_stage.log 2>&1; echo "variants rc=$? at $(el)"
wait $bqpid; echo "bq build rc=$? at $(el)"
BUILD=build-var-base STAGES=sdpa BENCH_SHAPES=S1,S2,S5 SDPA_ARGS=--no-backward OUT=$OUT/sdpa bash bench/device_run.sh > $OUT/sdpa_stage.log 2>&1; echo "sdpa rc=$? at $(el)"
t=build-bq/gpu_test_forward
timeout 200 $t > $OUT/gpu_forward_bq.log 2>&1; echo "forward grid (bq) rc=$? at $(el): $(grep -E 'passed|failed' $OUT/gpu_forward_bq.log | tail -2 | tr '\n' ' ')"
cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
left=$(( 580 - $(date +%s) + T0 ))
for tool in memcheck racecheck; do
    MODA_TEST_QUICK=1 timeout $left $cs --tool $tool --error-exitcode 99 $t > $OUT/cs_forward_bq_$tool.log 2>&1 &
done
wait
for tool in memcheck racecheck; do echo "$tool: $(grep -E 'passed|failed' $OUT/cs_forward_bq_$tool.log | tail -1) | $(grep SUMMARY $OUT/cs_forward_bq_$tool.log | tail -1)"; done
echo "== done at $(el)"
cat $OUT/var/variants_short.txt
grep -E "^\| S|ours|cuDNN|FA2" $OUT/sdpa/sdpa.log | head -12
cd $OUT && tar czf callI_logs.tgz var sdpa *.log 2>/dev/null && rm -rf var/build_var_*.log
