#!/usr/bin/env bash
# session 7 call M, H100: MODA_HOPPER_DEPTH_LINEAR (lin64 = 1: d = 64; lin = 2: both d): depth loads at
# base + k x slot stride when the token stride is L slots, against the shipped carried (token, slot) addressing;
# then the forward GPU grid on a LINEAR=2 build (its d = 64 kernels are lin64's), memcheck + racecheck of its quick grid.
set -u
T0=$(date +%s)
export MODA_GIT_COMMIT=${COMMIT:-unknown}
el() { echo "$(( $(date +%s) - T0 )) s"; }
( cmake -S . -B build-lin -DCMAKE_BUILD_TYPE=Release -DMODA_BUILD_MODEL=OFF -DCMAKE_CUDA_ARCHITECTURES=90a \
    "-DCMAKE_CUDA_FLAGS=-DMODA_HOPPER_DEPTH_LINEAR=2" && cmake --build build-lin -j6 --target gpu_test_forward ) > $OUT/build_k.log 2>&1 &
bpid=$!
STAGES=variants VARIANT_ENV=MODA_CUDA_FORWARD=auto BENCH_SHAPES=S1,S2,S3,S4,S5,S1n \
    VARIANTS="lin64=-DMODA_HOPPER_DEPTH_LINEAR=1 lin=-DMODA_HOPPER_DEPTH_LINEAR=2" \
    OUT=$OUT/var bash bench/device_run.sh > $OUT/variants_stage.log 2>&1; echo "variants rc=$? at $(el)"
wait $bpid; echo "test build rc=$? at $(el)"
t=build-lin/gpu_test_forward
timeout 200 $t > $OUT/gpu_forward.log 2>&1; echo "forward grid rc=$? at $(el): $(grep -E 'passed|failed' $OUT/gpu_forward.log | tail -2 | tr '\n' ' ')"
cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
left=$(( 580 - $(date +%s) + T0 ))
for tool in memcheck racecheck; do
    MODA_TEST_QUICK=1 timeout $left $cs --tool $tool --error-exitcode 99 $t > $OUT/cs_forward_$tool.log 2>&1 &
done
wait
for tool in memcheck racecheck; do echo "$tool: $(grep -E 'passed|failed' $OUT/cs_forward_$tool.log | tail -1) | $(grep SUMMARY $OUT/cs_forward_$tool.log | tail -1)"; done
echo "== done at $(el)"
grep -E "grid with" $OUT/gpu_forward.log
cat $OUT/var/variants_short.txt
cd $OUT && tar czf callM_logs.tgz var *.log 2>/dev/null && rm -rf var/build_var_*.log
