#!/usr/bin/env bash
# session 7 call G, H100:
#  1. the final trainer build (6430b23, = session 6's call F, which was cut off): build, parity, the row-kernel test,
#     then memcheck + racecheck of the row-kernel test and of the parity test's quick form, side by side;
#  2. Nsight Compute (clock control off) of the shipped sm_90a kernels: the forward on S1, S2, S5 (sections + stall
#     reasons + pipe utilisation) and the non-deterministic backward's kernels on S1, S2 (stall reasons, pipes, time).
set -u
T0=$(date +%s)
export MODA_GIT_COMMIT=${COMMIT:-unknown}
el() { echo "$(( $(date +%s) - T0 )) s"; }
# the library build (no model) in the background while the trainer builds
( OUT=$OUT/lib STAGES=build bash bench/device_run.sh > $OUT/lib_build.log 2>&1; echo "lib build rc=$? at $(el)" ) &
OUT=$OUT/train STAGES="build parity" bash experiments/device_train.sh > $OUT/train.log 2>&1; echo "trainer build+parity rc=$? at $(el)"
wait
M=/tmp/moda_build_model
cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
pids=""
for t in gpu_test_model_kernels gpu_test_model_gpu; do
    for tool in memcheck racecheck; do
        MODA_TEST_QUICK=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=2 timeout 240 $cs --tool $tool --error-exitcode 99 $M/$t > $OUT/cs_${t}_$tool.log 2>&1 &
        pids="$pids $!"
    done
done
for p in $pids; do wait $p; echo "sanitizer rc=$?"; done
echo "== sanitizers done at $(el)"
B=build-device/moda
[ -x $B ] || B=build-device/moda_bench_cuda
SECT="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis"
MET="gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,smsp__issue_active.avg.pct_of_peak_sustained_active,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,regex:sm__pipe_.*_cycles_active\.avg\.pct_of_peak_sustained_active,regex:sm__inst_executed_pipe_.*\.avg\.pct_of_peak_sustained_active"
for sh in S1 S2 S5; do
    timeout 90 ncu --clock-control none -k regex:hopper_fwd --launch-skip 3 -c 1 $SECT $B --device cuda --shapes $sh --reps 4 --no-backward > $OUT/ncu_fwd_$sh.log 2>&1; echo "ncu fwd sections $sh rc=$? at $(el)"
    timeout 90 ncu --clock-control none -k regex:hopper_fwd --launch-skip 3 -c 1 --metrics "$MET" $B --device cuda --shapes $sh --reps 4 --no-backward > $OUT/ncu_fwd_met_$sh.log 2>&1; echo "ncu fwd metrics $sh rc=$? at $(el)"
done
for sh in S1 S2; do
    timeout 120 ncu --clock-control none -k regex:bw_ --launch-skip 12 -c 6 --metrics "$MET" $B --device cuda --shapes $sh --reps 4 --nondeterministic > $OUT/ncu_bwd_met_$sh.log 2>&1; echo "ncu bwd metrics $sh rc=$? at $(el)"
done
echo "== done at $(el)"
grep -E "rc=|passed|failed" $OUT/train/summary.txt
for f in $OUT/cs_*.log; do echo "$(basename $f): $(grep -E 'passed|failed' $f | tail -1) | $(grep -E 'SUMMARY' $f | tail -1)"; done
for f in $OUT/ncu_*met*.log; do echo "== $(basename $f)"; grep -E "^  [a-z_ ]+.*\(|gpu__time|dram__|issue_active|stalled_(long|barrier|wait|math|short|mio|no_inst|not_sel|selected|dispatch|lg)|pipe_(tensor|fma|alu|xu|fp16|lsu).*cycles" $f | grep -v " 0$" | head -60; done
cd $OUT && tar czf ncu_logs.tgz ncu_*.log cs_*.log train lib 2>/dev/null; rm -rf ncu_*.log cs_*.log train lib
