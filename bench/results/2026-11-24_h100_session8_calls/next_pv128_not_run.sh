#!/usr/bin/env bash
# PREPARED, NOT RUN (session 8 had too little device time left to start a machine): the next call for MODA_HOPPER_PV128 (pv128: d = 128's P*V as one m64n128k16
# per k-step, V's halves as two swizzle atoms LBO apart) on the shipped loop and on ring3 (r3pv), against base and
# ring3. Builds side by side; the QUICK grid on both pv128 builds first (a wrong descriptor fails there: nothing is
# timed then); the A/B as base, pv128, r3pv, ring3, base, pv128, r3pv, ring3, base; the full grid and memcheck +
# racecheck of the quick grid on r3pv; then the sanitizers on pv128 if time is left. Every step has a deadline.
# Before running: the tree must still build with MODA_HOPPER_PV128 and MODA_HOPPER_RING3 (both in forward_hopper.cu).
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
build_test() { # dir flags
    { cmake -S . -B $1 -DCMAKE_BUILD_TYPE=Release -DMODA_BUILD_MODEL=OFF -DCMAKE_CUDA_ARCHITECTURES=90a "-DCMAKE_CUDA_FLAGS=$2" \
        && cmake --build $1 -j3 --target gpu_test_forward; } > $OUT/build_$1.log 2>&1
}
build_variant base "" &
build_variant pv128 "-DMODA_HOPPER_PV128=1" &
build_variant r3pv "-DMODA_HOPPER_PV128=1 -DMODA_HOPPER_RING3=1" &
build_variant ring3 "-DMODA_HOPPER_RING3=1" &
build_test build-pv "-DMODA_HOPPER_PV128=1" &
build_test build-r3pv "-DMODA_HOPPER_PV128=1 -DMODA_HOPPER_RING3=1" &
wait
echo "builds done at $(el): $(ls build-var-*/bench build-pv/gpu_test_forward build-r3pv/gpu_test_forward 2>&1 | tr '\n' ' ')"
MODA_TEST_QUICK=1 timeout 40 build-pv/gpu_test_forward > $OUT/quick_pv.log 2>&1; q1=$?
echo "quick grid pv128 rc=$q1 at $(el): $(grep -E '^gpu_test_forward:' $OUT/quick_pv.log | tail -1)"
t=build-r3pv/gpu_test_forward
MODA_TEST_QUICK=1 timeout 40 $t > $OUT/quick.log 2>&1; qrc=$?
echo "quick grid r3pv rc=$qrc at $(el): $(grep -E '^gpu_test_forward:' $OUT/quick.log | tail -1)"
if [ $qrc -eq 0 ] && [ $q1 -eq 0 ]; then
    : > $OUT/variants.txt
    for n in base pv128 r3pv ring3 base pv128 r3pv ring3 base; do
        echo "## variant $n" >> $OUT/variants.txt
        MODA_CUDA_FORWARD=auto timeout 45 build-var-$n/bench --device cuda --shapes S5,S5n,S2 --no-backward >> $OUT/variants.txt 2>&1
    done
    grep -E "^## |^\| S" $OUT/variants.txt | awk '/^## /{v=$3; next} {print v, $0}' > $OUT/variants_short.txt
    echo "A/B done at $(el)"
    timeout $(left 190) $t > $OUT/gpu_forward.log 2>&1; echo "forward grid rc=$? at $(el): $(grep -E '^gpu_test_forward:' $OUT/gpu_forward.log | tail -1)"
    cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    lt=$(left 240)
    for tool in memcheck racecheck; do
        MODA_TEST_QUICK=1 timeout $lt $cs --tool $tool --error-exitcode 99 $t > $OUT/cs_forward_$tool.log 2>&1 &
    done
    wait
    for tool in memcheck racecheck; do echo "$tool: $(grep -E '^gpu_test_forward:' $OUT/cs_forward_$tool.log | tail -1) | $(grep SUMMARY $OUT/cs_forward_$tool.log | tail -1)"; done
    lt=$(left 275)
    for tool in memcheck racecheck; do
        MODA_TEST_QUICK=1 timeout $lt $cs --tool $tool --error-exitcode 99 build-pv/gpu_test_forward > $OUT/cs_pv_$tool.log 2>&1 &
    done
    wait
    for tool in memcheck racecheck; do echo "pv128 $tool: $(grep -E '^gpu_test_forward:' $OUT/cs_pv_$tool.log | tail -1) | $(grep SUMMARY $OUT/cs_pv_$tool.log | tail -1)"; done
fi
echo "== done at $(el)"
grep -E "grid with|FAIL" $OUT/gpu_forward.log $OUT/quick.log $OUT/quick_pv.log 2>/dev/null | head -12
cat $OUT/variants_short.txt 2>/dev/null
cd $OUT && tar czf callC_logs.tgz *.log *.txt 2>/dev/null
