#!/usr/bin/env bash
# session 7 call H (same warm machine as call G, whose build trees it reuses): call G's Nsight Compute part again
# (G called the binary without its `bench` subcommand), then racecheck of the parity test's quick form alone
# (in G it shared the machine with three other sanitizer runs and hit its 240 s limit).
set -u
T0=$(date +%s)
el() { echo "$(( $(date +%s) - T0 )) s"; }
# a fresh machine has neither build tree: build them (in parallel)
[ -x build-device/moda ] || ( OUT=$OUT/lib STAGES=build bash bench/device_run.sh > $OUT/lib_build.log 2>&1; echo "lib build rc=$? at $(el)" ) &
[ -x /tmp/moda_build_model/gpu_test_model_gpu ] || ( OUT=$OUT/train STAGES=build bash experiments/device_train.sh > $OUT/train_build.log 2>&1; echo "trainer build rc=$? at $(el)" ) &
wait
B="build-device/moda bench"
SECT="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis"
MET="gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,smsp__issue_active.avg.pct_of_peak_sustained_active,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,regex:sm__pipe_.*_cycles_active\.avg\.pct_of_peak_sustained_active,regex:sm__inst_executed_pipe_.*\.avg\.pct_of_peak_sustained_active"
for sh in S1 S2 S5; do
    timeout 90 ncu --clock-control none -k regex:hopper_fwd --launch-skip 3 -c 1 $SECT $B --device cuda --shapes $sh --reps 20 --no-backward > $OUT/ncu_fwd_$sh.log 2>&1; echo "ncu fwd sections $sh rc=$? at $(el)"
    timeout 90 ncu --clock-control none -k regex:hopper_fwd --launch-skip 3 -c 1 --metrics "$MET" $B --device cuda --shapes $sh --reps 20 --no-backward > $OUT/ncu_fwd_met_$sh.log 2>&1; echo "ncu fwd metrics $sh rc=$? at $(el)"
done
for sh in S1 S2; do
    timeout 120 ncu --clock-control none -k regex:bw_ --launch-skip 12 -c 6 --metrics "$MET" $B --device cuda --shapes $sh --reps 20 --nondeterministic > $OUT/ncu_bwd_met_$sh.log 2>&1; echo "ncu bwd metrics $sh rc=$? at $(el)"
done
echo "== ncu done at $(el)"
cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
left=$(( 570 - $(date +%s) + T0 ))
MODA_TEST_QUICK=1 OMP_NUM_THREADS=8 OPENBLAS_NUM_THREADS=8 timeout $left $cs --tool racecheck --error-exitcode 99 /tmp/moda_build_model/gpu_test_model_gpu > $OUT/cs_gpu_test_model_gpu_racecheck.log 2>&1; echo "racecheck parity rc=$? at $(el)"
echo "cs: $(grep -E 'passed|failed' $OUT/cs_gpu_test_model_gpu_racecheck.log | tail -1) | $(grep -E 'SUMMARY' $OUT/cs_gpu_test_model_gpu_racecheck.log | tail -1)"
for f in $OUT/ncu_*met*.log; do echo "== $(basename $f)"; grep -E "^  [a-z_ ]+.*\(|gpu__time|dram__|issue_active|stalled_(long|barrier|wait|math|short|mio|no_inst|not_sel|selected|dispatch|lg)|pipe_(tensor|fma|alu|xu|fp16|lsu).*cycles" $f | grep -v " 0$" | head -40; done
cd $OUT && tar czf ncu_logs.tgz ncu_*.log cs_*.log 2>/dev/null; rm -f ncu_*.log cs_*.log
