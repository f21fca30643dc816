#!/usr/bin/env bash
# session 6 call A (tree f9a95ca + this script), H100:
#  1. build the library+tests and the trainer side by side;
#  2. on a quiet GPU: the overlap draft swept (MODA_CUDA_BWD_OVERLAP over S1, S2, S5 fwd+bwd, non-deterministic,
#     the switch unset first and last), the trainer's attn+ffn row with the warp depth kernel (default), the
#     tensor-core one and the tensor-core one beside the sequence pass, and the two depth-free rows the MFU
#     targets name;
#  3. Nsight Compute per-kernel times of two training steps of D768 T1024 none and D384 T4096 none;
#  4. with the rest of the call: the quick backward grid (it includes the overlap checks) and memcheck +
#     racecheck of it, side by side.
set -u
T0=$(date +%s)
left() { echo $(( 585 - ($(date +%s) - T0) )); }
export MODA_GIT_COMMIT=f9a95ca
B=build-device
( STAGES=build bash bench/device_run.sh > $OUT/lib_build.log 2>&1; echo "lib build rc=$?" ) &
( OUT=$OUT/train STAGES=build bash experiments/device_train.sh > $OUT/train_build.log 2>&1; echo "model build rc=$?" ) &
wait
echo "== builds done at $(( $(date +%s) - T0 )) s"
STAGES=envsweep BENCH_SHAPES=S1,S2,S5 BENCH_ARGS=--nondeterministic BENCH_TIMEOUT=30 \
    ENV_SWEEP="MODA_CUDA_BWD_OVERLAP=8,16,32,48,66" bash bench/device_run.sh > $OUT/envsweep.log 2>&1; echo "envsweep rc=$?"
echo "== sweep done at $(( $(date +%s) - T0 )) s"
mkdir -p $OUT/tr_warp $OUT/tr_tdc $OUT/tr_ovl
OUT=$OUT/tr_warp STAGES=speed SPEED_STEPS=10 PROFILE_STEPS=1 \
    SPEED_CONFIGS="d384_T1024_attnffn_nd d768_T1024_none_nd d384_T4096_none_nd" \
    timeout 80 bash experiments/device_train.sh > $OUT/tr_warp.log 2>&1; echo "trainer warp rc=$?"
MODA_CUDA_BWD_TDC_F32=1 OUT=$OUT/tr_tdc STAGES=speed SPEED_STEPS=10 PROFILE_STEPS=1 SPEED_CONFIGS="d384_T1024_attnffn_nd" \
    timeout 30 bash experiments/device_train.sh > $OUT/tr_tdc.log 2>&1; echo "trainer tdc rc=$?"
for n in 16 32; do
    mkdir -p $OUT/tr_ovl$n
    MODA_CUDA_BWD_TDC_F32=1 MODA_CUDA_BWD_OVERLAP=$n OUT=$OUT/tr_ovl$n STAGES=speed SPEED_STEPS=10 PROFILE_STEPS=1 \
        SPEED_CONFIGS="d384_T1024_attnffn_nd" timeout 30 bash experiments/device_train.sh > $OUT/tr_ovl$n.log 2>&1
    echo "trainer overlap $n rc=$?"
done
echo "== trainer rows done at $(( $(date +%s) - T0 )) s"
OUT=$OUT/kern STAGES=kernels KERNEL_STEPS=2 KERNEL_TIMEOUT=100 KERNEL_CONFIGS="d768_T1024_none_nd d384_T4096_none_nd" \
    bash experiments/device_train.sh > $OUT/kernels.log 2>&1; echo "kernels rc=$?"
echo "== ncu done at $(( $(date +%s) - T0 )) s, left $(left) s"
cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck; do
    MODA_TEST_QUICK=1 timeout $(( $(left) - 20 )) $cs --tool $tool --error-exitcode 99 $B/gpu_test_backward > $OUT/cs_$tool.log 2>&1 &
    eval "pid_$tool=\$!"
done
MODA_TEST_QUICK=1 timeout $(( $(left) - 20 )) $B/gpu_test_backward > $OUT/gpu_test_backward_quick.log 2>&1; echo "quick grid rc=$? at $(( $(date +%s) - T0 )) s"
for tool in memcheck racecheck; do eval "wait \$pid_$tool"; echo "$tool rc=$? at $(( $(date +%s) - T0 )) s"; tail -2 $OUT/cs_$tool.log; done
echo; grep -E "passed|failed|FAIL|ran [0-9]+ of" $OUT/gpu_test_backward_quick.log | tail -8
grep -E "FAIL|ran [0-9]+ of" $OUT/cs_*.log | head -8
echo "sweep:"; cat $OUT/envsweep_short.txt 2>/dev/null || grep -E "^## |^\| S" $OUT/envsweep.txt
echo "trainer:"; for d in tr_warp tr_tdc tr_ovl16 tr_ovl32; do echo "[$d]"; cut -c1-200 $OUT/$d/summary.txt | tail -n +2; done
grep -E "^kernels" $OUT/kern/summary.txt
(cd $OUT && tar czf /tmp/all.tgz . && rm -rf $OUT/* && mv /tmp/all.tgz $OUT/)
echo "== done at $(( $(date +%s) - T0 )) s"
