#!/usr/bin/env bash
# run.sh BUILD_DIR - what `make gpu-test` runs on a machine with an NVIDIA GPU. Builds nothing.
#  1. every gpu_* executable in BUILD_DIR (full grids and the benchmark shapes on sampled rows);
#  2. compute-sanitizer memcheck and racecheck over each of them on the small grid (MODA_TEST_QUICK=1).
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
        for tool in memcheck racecheck; do
            for t in "${tests[@]}"; do
                [ -x "$t" ] || continue
                echo "== compute-sanitizer --tool $tool $(basename "$t") (quick grid)"
                if ! MODA_TEST_QUICK=1 "$cs" --tool "$tool" --error-exitcode 99 "$t" > "${TMPDIR:-/tmp}/cs_$$.log" 2>&1; then
                    tail -40 "${TMPDIR:-/tmp}/cs_$$.log"
                    echo "FAILED: $tool $(basename "$t")"
                    fail=1
                else
                    tail -2 "${TMPDIR:-/tmp}/cs_$$.log"
                fi
            done
        done
        rm -f "${TMPDIR:-/tmp}/cs_$$.log"
    fi
fi
if [ $fail -ne 0 ]; then echo "gpu-test: FAILED"; exit 1; fi
echo "gpu-test: all passed"
