#!/usr/bin/env bash
# run.sh BUILD_DIR - what `make gpu-test` runs on a machine with an NVIDIA GPU. Builds nothing.
#  1. every gpu_* executable in BUILD_DIR (full grids and the benchmark shapes on sampled rows);
#  2. compute-sanitizer memcheck and racecheck over each of them on the small grid (MODA_TEST_QUICK=1), the two
#     tools side by side.
# Exits non-zero on any failure. MODA_GPU_TEST_NO_SANITIZER=1 skips step 2.
set -u
build=${1:?usage: tests/gpu/run.sh BUILD_DIR}
shopt -s nullglob
tests=("$build"/gpu_*)
if [ ${#tests[@]} -eq 0 ]; then
    echo "run.sh: no gpu_* executables in $build (was it configured with CUDA?)" >&2
    exit 1
fi
fail=0
for t in "${tests[@]}"; do
    [ -x "$t" ] || continue
    echo "== $(basename "$t")"
    if ! "$t"; then echo "FAILED: $(basename "$t")"; fail=1; fi
done
if [ "${MODA_GPU_TEST_NO_SANITIZER:-0}" != 1 ]; then
    cs=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
    if [ -z "$cs" ]; then
        echo "run.sh: compute-sanitizer not found" >&2
        fail=1
    else
        # memcheck and racecheck of one test run side by side, to save device time: both are slow (their
        # instrumentation runs on the host) and ran past the time a device call had for them (session 4)
        for t in "${tests[@]}"; do
            [ -x "$t" ] || continue
            for tool in memcheck racecheck; do
                MODA_TEST_QUICK=1 "$cs" --tool "$tool" --error-exitcode 99 "$t" > "${TMPDIR:-/tmp}/cs_$$_$tool.log" 2>&1 &
                eval "pid_$tool=\$!"
            done
            for tool in memcheck racecheck; do
                eval "pid=\$pid_$tool"
                echo "== compute-sanitizer --tool $tool $(basename "$t") (quick grid)"
                if ! wait "$pid"; then
                    tail -40 "${TMPDIR:-/tmp}/cs_$$_$tool.log"
                    echo "FAILED: $tool $(basename "$t")"
                    fail=1
                else
                    tail -2 "${TMPDIR:-/tmp}/cs_$$_$tool.log"
                fi
            done
        done
        rm -f "${TMPDIR:-/tmp}"/cs_$$_*.log
    fi
fi
if [ $fail -ne 0 ]; then echo "gpu-test: FAILED"; exit 1; fi
echo "gpu-test: all passed"
