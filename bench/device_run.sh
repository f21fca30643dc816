#!/usr/bin/env bash
# device_run.sh - the ONE script run on the GPU machine: builds, checks, times everything in one call, writes
# logs under $OUT and prints a short table last.
#   bash bench/device_run.sh            # build + gpu tests + sanitizers + moda bench + SDPA comparison
# Stages can be narrowed with STAGES="build test sanitize check pytest bench sdpa" (default: all of them; the
# extra stage "profile" runs Nsight Compute on PROFILE_SHAPES, default S1,S2, kernels matching PROFILE_KERNELS;
# "variants" times kernel variants built with extra CUDA flags side by side, see VARIANTS below; "envsweep" times
# one environment switch at several values, ENV_SWEEP="NAME=v1,v2,...");
# BENCH_SHAPES=S1,S3 narrows the timed shapes; MODA_GPU_TEST_FILTER=forward runs only gpu_*forward*;
# BENCH_ARGS / SDPA_ARGS add options to the two timers (e.g. --no-backward to both).
set -u
OUT=${OUT:-/tmp/moda_device_out}
mkdir -p "$OUT"
STAGES=${STAGES:-"build test sanitize check pytest bench sdpa"}
SHAPES=${BENCH_SHAPES:-S1,S2,S3,S4,S5}
BUILD=${BUILD_DIR:-build-device}
# The device copy of the tree may have no .git: the caller can pass MODA_GIT_COMMIT=<hash> on the command line.
commit=${MODA_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
if [ -z "${MODA_GIT_COMMIT:-}" ] && [ -n "$(git status --porcelain 2>/dev/null | grep -v '^??' | head -1)" ]; then
    commit="$commit+dirty"
fi
export MODA_GIT_COMMIT=$commit
summary="$OUT/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }
has() { case " $STAGES " in *" $1 "*) return 0 ;; esac; return 1; }

note "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1); commit $commit; $(date -u +%FT%TZ)"
t0=$(date +%s)
if has build; then
    { cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DMODA_BUILD_MODEL=OFF -DCMAKE_CUDA_ARCHITECTURES=90a \
        && cmake --build "$BUILD" -j16 -- -k; } > "$OUT/build.log" 2>&1
    rc=$?
    # keep going past targets that are not ours (a broken CPU test must not hide the GPU numbers)
    if [ $rc -ne 0 ] && [ -f "$BUILD/libmoda.so" ]; then
        note "build: some targets failed: $(grep -E '\*\*\* \[' "$OUT/build.log" | sed 's/.*\[//; s/\].*//' | tr '\n' ' ')"
        rc=0
    fi
    grep -E "spill|error" "$OUT/build.log" | grep -v "0 bytes spill" | head -20
    # the moda CLI may fail for reasons outside the library (e.g. a model-only tool without the model build):
    # then the CUDA bench is linked on its own from tools/bench_cuda.c and libmoda.so
    if [ $rc -eq 0 ] && [ ! -x "$BUILD/moda" ]; then
        printf 'int moda_cmd_bench_cuda(int, char **);\nint main(int c, char **v) { return moda_cmd_bench_cuda(c, v); }\n' \
            > "$BUILD/bench_main.c"
        cc -O2 -std=c11 -DMODA_WITH_CUDA=1 -Iinclude -Isrc -Itools -I/usr/local/cuda/include "$BUILD/bench_main.c" \
            tools/bench_cuda.c -L"$BUILD" -lmoda -L/usr/local/cuda/lib64 -lcudart -Wl,-rpath,"$PWD/$BUILD" \
            -o "$BUILD/moda_bench_cuda" >> "$OUT/build.log" 2>&1 && note "build: moda CLI missing, bench linked alone"
    fi
    note "build: rc=$rc ($(( $(date +%s) - t0 )) s)"
    if [ $rc -ne 0 ]; then tail -40 "$OUT/build.log"; exit 1; fi
fi

sel_tests() {
    local f=${MODA_GPU_TEST_FILTER:-}
    mkdir -p "$BUILD/gpu_sel"
    rm -f "$BUILD"/gpu_sel/*
    for t in "$BUILD"/gpu_*; do
        [ -f "$t" ] && [ -x "$t" ] || continue
        case "$(basename "$t")" in *"$f"*) ln -sf "$(realpath "$t")" "$BUILD/gpu_sel/$(basename "$t")" ;; esac
    done
}
if has test || has sanitize; then
    sel_tests
    t1=$(date +%s)
    ns=1
    has sanitize && ns=0
    if has test; then
        MODA_GPU_TEST_NO_SANITIZER=$ns timeout ${TEST_TIMEOUT:-540} bash tests/gpu/run.sh "$BUILD/gpu_sel" > "$OUT/gpu_test.log" 2>&1
    else
        # sanitizers only: run.sh with every full test skipped is not offered, so run the quick grids
        MODA_TEST_QUICK=1 MODA_GPU_TEST_NO_SANITIZER=0 timeout ${TEST_TIMEOUT:-540} bash tests/gpu/run.sh "$BUILD/gpu_sel" > "$OUT/gpu_test.log" 2>&1
    fi
    rc=$?
    grep -E "FAIL|passed|failed|sampled|skip|ERROR SUMMARY|==" "$OUT/gpu_test.log" | head -60
    note "gpu tests (sanitizers $([ $ns = 0 ] && echo on || echo off)): rc=$rc ($(( $(date +%s) - t1 )) s)"
fi
if has check; then
    t1=$(date +%s)
    timeout ${CHECK_TIMEOUT:-120} ./$BUILD/moda check --device cuda > "$OUT/check.log" 2>&1
    rc=$?
    tail -14 "$OUT/check.log"
    note "moda check --device cuda: rc=$rc ($(( $(date +%s) - t1 )) s)"
fi
if has pytest; then
    t1=$(date +%s)
    MODA_LIBRARY="$PWD/$BUILD/libmoda.so" PYTHONPATH=python timeout ${PYTEST_TIMEOUT:-240} \
        bash python/tests/run_gpu_tests.sh -q > "$OUT/pytest_gpu.log" 2>&1
    rc=$?
    grep -E "FAILED|ERROR|passed|failed" "$OUT/pytest_gpu.log" | tail -12
    note "python GPU tests: rc=$rc ($(( $(date +%s) - t1 )) s)"
fi
if has bench; then
    t1=$(date +%s)
    bench_cmd="./$BUILD/moda bench"
    [ -x "$BUILD/moda" ] || bench_cmd="./$BUILD/moda_bench_cuda"
    timeout ${BENCH_TIMEOUT:-200} $bench_cmd --device cuda --shapes "$SHAPES" ${BENCH_ARGS:-} --json "$OUT/bench_cuda.json" > "$OUT/bench_cuda.log" 2>&1
    note "moda bench: rc=$? ($(( $(date +%s) - t1 )) s)"
    # BENCH_ALT_ENV (e.g. MODA_CUDA_FORWARD=mma): the forward timed once more under that environment, in the
    # same process tree, as a same-run baseline for the default path.
    if [ -n "${BENCH_ALT_ENV:-}" ]; then
        env $BENCH_ALT_ENV timeout ${BENCH_TIMEOUT:-200} $bench_cmd --device cuda --shapes "$SHAPES" --no-backward \
            --json "$OUT/bench_cuda_alt.json" > "$OUT/bench_cuda_alt.log" 2>&1
        note "moda bench ($BENCH_ALT_ENV, forward): rc=$?"
    fi
fi
if has sdpa; then
    t1=$(date +%s)
    PYTHONUNBUFFERED=1 PYTHONPATH=python MODA_LIBRARY="$PWD/$BUILD/libmoda.so" timeout ${SDPA_TIMEOUT:-200} python3 bench/compare_sdpa.py \
        --lib "$BUILD/libmoda.so" --shapes "$SHAPES" ${SDPA_ARGS:-} --json "$OUT/sdpa.json" > "$OUT/sdpa.log" 2>&1
    note "compare_sdpa: rc=$? ($(( $(date +%s) - t1 )) s)"
fi
if has variants; then
    # Kernel variants timed side by side in this one process tree: each VARIANTS entry name=FLAGS builds its
    # own libmoda.so with those CUDA flags (e.g. forward=-DMODA_FWD_INTERLEAVE=1) and runs the same bench
    # binary against it; "base" (no flags) is timed first and last, so the spread of the two says what noise is.
    # VARIANT_ENV (default MODA_CUDA_FORWARD=mma: the forward variants live in the mma.sync kernel, which the
    # Hopper kernel replaces by default on an H100) is set for every variant's bench.
    t1=$(date +%s)
    VARIANTS=${VARIANTS:-"interleave=-DMODA_FWD_INTERLEAVE=1 skip=-DMODA_FWD_RESCALE_SKIP=1"}
    printf 'int moda_cmd_bench_cuda(int, char **);\nint main(int c, char **v) { return moda_cmd_bench_cuda(c, v); }\n' \
        > "$OUT/bench_main.c"
    build_variant() { # name flags
        local dir="build-var-$1"
        { cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release -DMODA_BUILD_MODEL=OFF -DMODA_BUILD_TESTS=OFF \
            -DMODA_BUILD_TOOLS=OFF -DCMAKE_CUDA_ARCHITECTURES=90a "-DCMAKE_CUDA_FLAGS=$2" \
            && cmake --build "$dir" -j8 --target moda \
            && cc -O2 -std=c11 -DMODA_WITH_CUDA=1 -Iinclude -Isrc -Itools -I/usr/local/cuda/include "$OUT/bench_main.c" \
                tools/bench_cuda.c -L"$dir" -lmoda -L/usr/local/cuda/lib64 -lcudart -Wl,-rpath,"$PWD/$dir" \
                -o "$dir/bench"; } > "$OUT/build_var_$1.log" 2>&1
    }
    names="base"
    build_variant base "" &
    # a '+' in FLAGS stands for a space (VARIANTS is split on spaces): both=-DA=1+-DB=1
    for v in $VARIANTS; do build_variant "${v%%=*}" "$(echo "${v#*=}" | tr '+' ' ')" & names="$names ${v%%=*}"; done
    wait
    : > "$OUT/variants.txt"
    for n in $names base; do
        if [ ! -x "build-var-$n/bench" ]; then note "variant $n: build failed"; tail -5 "$OUT/build_var_$n.log"; continue; fi
        echo "## variant $n" >> "$OUT/variants.txt"
        env ${VARIANT_ENV:-MODA_CUDA_FORWARD=mma} timeout ${BENCH_TIMEOUT:-200} "build-var-$n/bench" --device cuda --shapes "$SHAPES" ${VARIANT_BENCH_ARGS:---no-backward} \
            >> "$OUT/variants.txt" 2>&1
    done
    grep -E "^## |^\| S" "$OUT/variants.txt" | awk '/^## /{v=$3; next} {print v, $0}' | tee "$OUT/variants_short.txt"
    note "variants: $(( $(date +%s) - t1 )) s"
fi
if has envsweep; then
    # ENV_SWEEP="NAME=v1,v2,...": moda bench (BENCH_SHAPES, BENCH_ARGS) once per value of one switch, in one
    # process tree, with the switch unset first and last (the spread of those two says what noise is).
    t1=$(date +%s)
    sname=${ENV_SWEEP%%=*}
    svals=$(echo "${ENV_SWEEP#*=}" | tr ',' ' ')
    scmd="./$BUILD/moda bench"
    [ -x "$BUILD/moda" ] || scmd="./$BUILD/moda_bench_cuda"
    : > "$OUT/envsweep.txt"
    for v in unset $svals unset; do
        echo "## $sname=$v" >> "$OUT/envsweep.txt"
        if [ "$v" = unset ]; then sw="-u $sname"; else sw="$sname=$v"; fi
        # shellcheck disable=SC2086
        env $sw timeout ${BENCH_TIMEOUT:-200} $scmd --device cuda --shapes "$SHAPES" ${BENCH_ARGS:-} >> "$OUT/envsweep.txt" 2>&1
    done
    grep -E "^## |^\| S" "$OUT/envsweep.txt" | awk '/^## /{v=$2; next} {print v, $0}' | tee "$OUT/envsweep_short.txt"
    note "envsweep $sname: $(( $(date +%s) - t1 )) s"
fi
if has profile; then
    # Nsight Compute on the kernels of one timed shape each (clock control off: the card's own clocks, as the
    # timings run). PROFILE_KERNELS is a regex on kernel names, PROFILE_SKIP skips launches (the warm-ups).
    t1=$(date +%s)
    pcmd="./$BUILD/moda bench"
    [ -x "$BUILD/moda" ] || pcmd="./$BUILD/moda_bench_cuda"
    for sh in $(echo "${PROFILE_SHAPES:-S1,S2}" | tr ',' ' '); do
        timeout ${PROFILE_TIMEOUT:-150} ncu --clock-control none -k "regex:${PROFILE_KERNELS:-fwd}" \
            --launch-skip ${PROFILE_SKIP:-2} -c ${PROFILE_COUNT:-1} --section SpeedOfLight --section Occupancy \
            --section LaunchStats --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
            $pcmd --device cuda --shapes "$sh" --reps 3 ${BENCH_ARGS:-} > "$OUT/ncu_$sh.log" 2>&1
        note "ncu $sh: rc=$?"
        grep -E "^  [a-z_]+.*\(|Duration|Compute \(SM\) Throughput|DRAM Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Issue Slots Busy|No Eligible|Local Memory Spill|L2 Hit Rate|Stall" \
            "$OUT/ncu_$sh.log" | head -40 | tee -a "$OUT/ncu_summary.txt"
    done
    note "profile: $(( $(date +%s) - t1 )) s"
fi
echo
[ -f "$OUT/bench_cuda.log" ] && cat "$OUT/bench_cuda.log"
[ -f "$OUT/bench_cuda_alt.log" ] && { echo "($BENCH_ALT_ENV)"; grep -E "^\| S" "$OUT/bench_cuda_alt.log"; }
[ -f "$OUT/sdpa.log" ] && tail -12 "$OUT/sdpa.log"
echo
cat "$summary"
