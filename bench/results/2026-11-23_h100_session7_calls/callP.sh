#!/usr/bin/env bash
# session 7 call P, H100: the depth mask on key ranges (MODA_HOPPER_DEPTH_KEYRANGE=1, the candidate default)
# against the shipped carried mask (old = -DMODA_HOPPER_DEPTH_KEYRANGE=0, PTX byte-identical to efb6205); then the
# forward GPU grid (both paths) on the default build, and memcheck + racecheck of its quick grid.
set -u
T0=$(date +%s)
export MODA_GIT_COMMIT=${COMMIT:-unknown}
el() { echo "$(( $(date +%s) - T0 )) s"; }
( cmake -S . -B build-p -DCMAKE_BUILD_TYPE=Release -DMODA_BUILD_MODEL=OFF -DCMAKE_CUDA_ARCHITECTURES=90a \
    && cmake --build build-p -j6 --target gpu_test_forward ) > $OUT/build_p.log 2>&1 &
bpid=$!
STAGES=variants VARIANT_ENV=MODA_CUDA_FORWARD=auto BENCH_SHAPES=S1,S2,S3,S4,S5,S1n \
    VARIANTS="old=-DMODA_HOPPER_DEPTH_KEYRANGE=0" \
    OUT=$OUT/var bash bench/device_run.sh > $OUT/variants_stage.log 2>&1; echo "variants rc=$? at $(el)"
wait $bpid; echo "test build rc=$? at $(el)"
t=build-p/gpu_test_forward
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
cd $OUT && tar czf callP_logs.tgz var *.log 2>/dev/null && rm -rf var/build_var_*.log
