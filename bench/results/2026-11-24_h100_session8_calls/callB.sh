#!/usr/bin/env bash
# session 8 call B, H100 (252 s of device time left): MODA_HOPPER_RING3 (ring3: d = 128 with a three-stage ring,
# the unchanged overlapped loop of d = 64, and the depth part after the loop entirely in the idle ring) against the
# shipped d = 128 loop and call A's ovl128 (split K/V barriers, two stages). Builds side by side; the QUICK grid on
# the ring3 build first (nothing is timed if it fails or hangs); the A/B as base, ring3, ovl128, base, ring3,
# ovl128, base; the full grid, memcheck + racecheck of the quick grid on ring3. Every step has a deadline.
set -u
T0=$(date +%s)
export MODA_GIT_COMMIT=${COMMIT:-unknown}
el() { echo "$(( $(date +%s) - T0 )) s"; }
left() { local l=$(( $1 - $(date +%s) + T0 )); [ $l -lt 5 ] && l=5; echo $l; }
printf 'int moda_cmd_bench_cuda(int, char **);\nint main(int c, char **v) { return moda_cmd_bench_cuda(c, v); }\n' > $OUT/bench_main.c
build_variant() { # name flags (as bench/device_run.sh's variants stage)
    local dir="build-var-$1"
    { cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release -DMODA_BUILD_MODEL=OFF -DMODA_BUILD_TESTS=OFF \
        -DMODA_BUILD_TOOLS=OFF -DCMAKE_CUDA_ARCHITECTURES=90a "-DCMAKE_CUDA_FLAGS=$2" \
        && cmake --build "$dir" -j4 --target moda \
        && cc -O2 -std=c11 -DMODA_WITH_CUDA=1 -Iinclude -Isrc -Itools -I/usr/local/cuda/include $OUT/bench_main.c \
            tools/bench_cuda.c -L"$dir" -lmoda -L/usr/local/cuda/lib64 -lcudart -Wl,-rpath,"$PWD/$dir" -o "$dir/bench"; } \
        > $OUT/build_var_$1.log 2>&1
}
build_variant base "" &
build_variant ring3 "-DMODA_HOPPER_RING3=1" &
build_variant ovl128 "-DMODA_HOPPER_OVL128=1" &
( cmake -S . -B build-r3 -DCMAKE_BUILD_TYPE=Release -DMODA_BUILD_MODEL=OFF -DCMAKE_CUDA_ARCHITECTURES=90a \
    "-DCMAKE_CUDA_FLAGS=-DMODA_HOPPER_RING3=1" && cmake --build build-r3 -j4 --target gpu_test_forward ) > $OUT/build_t.log 2>&1 &
wait
echo "builds done at $(el): $(ls build-var-*/bench build-r3/gpu_test_forward 2>&1 | tr '\n' ' ')"
t=build-r3/gpu_test_forward
MODA_TEST_QUICK=1 timeout 40 $t > $OUT/quick.log 2>&1; qrc=$?
echo "quick grid rc=$qrc at $(el): $(grep -E '^gpu_test_forward:' $OUT/quick.log | tail -1)"
if [ $qrc -eq 0 ]; then
    : > $OUT/variants.txt
    for n in base ring3 ovl128 base ring3 ovl128 base; do
        echo "## variant $n" >> $OUT/variants.txt
        MODA_CUDA_FORWARD=auto timeout 45 build-var-$n/bench --device cuda --shapes S5,S5n,S2 --no-backward >> $OUT/variants.txt 2>&1
    done
    grep -E "^## |^\| S" $OUT/variants.txt | awk '/^## /{v=$3; next} {print v, $0}' > $OUT/variants_short.txt
    echo "A/B done at $(el)"
    timeout $(left 225) $t > $OUT/gpu_forward.log 2>&1; echo "forward grid rc=$? at $(el): $(grep -E '^gpu_test_forward:' $OUT/gpu_forward.log | tail -1)"
    cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    lt=$(left 285)
    for tool in memcheck racecheck; do
        MODA_TEST_QUICK=1 timeout $lt $cs --tool $tool --error-exitcode 99 $t > $OUT/cs_forward_$tool.log 2>&1 &
    done
    wait
    for tool in memcheck racecheck; do echo "$tool: $(grep -E '^gpu_test_forward:' $OUT/cs_forward_$tool.log | tail -1) | $(grep SUMMARY $OUT/cs_forward_$tool.log | tail -1)"; done
fi
echo "== done at $(el)"
grep -E "grid with|FAIL" $OUT/gpu_forward.log $OUT/quick.log 2>/dev/null | head -12
cat $OUT/variants_short.txt 2>/dev/null
cd $OUT && tar czf callB_logs.tgz *.log *.txt 2>/dev/null
