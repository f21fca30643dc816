#!/usr/bin/env bash
# session 6 call E, H100: the backward row kernels with their chunk count capped at one wave (one_wave_chunks:
# SMs x resident CTAs instead of the trainer's 512) against the same kernels with 512 chunks (296eb20's
# gpu_kernels.cu, .staged/gpu_kernels_296eb20.cu, carried), built side by side from one tree.
#  1. builds; 2. speed rows old, new, old, new on a quiet GPU; 3. ncu per-kernel times of two steps (new);
#  4. parity and the row-kernel test on the new build (device_train.sh's parity stage).
set -u
T0=$(date +%s)
export MODA_GIT_COMMIT=${COMMIT:-unknown}
rm -rf /tmp/oldtree && mkdir -p /tmp/oldtree && tar --exclude=./build-device --exclude=./.staged -cf - . | tar -xf - -C /tmp/oldtree
cp .staged/gpu_kernels_296eb20.cu /tmp/oldtree/src/model/cuda/gpu_kernels.cu
( OUT=$OUT/train STAGES=build bash experiments/device_train.sh > $OUT/train_build.log 2>&1; echo "model build rc=$?" ) &
( cd /tmp/oldtree && OUT=$OUT/train_old BUILD=/tmp/moda_build_old STAGES=build bash experiments/device_train.sh > $OUT/train_old_build.log 2>&1; echo "old model build rc=$?" ) &
wait
echo "== builds done at $(( $(date +%s) - T0 )) s"
CFGS="d768_T1024_none_nd d384_T4096_none_nd d384_T1024_attnffn_nd"
for rep in 1 2; do
    for v in old new; do
        if [ $v = old ]; then bd=/tmp/moda_build_old; else bd=/tmp/moda_build_model; fi
        mkdir -p $OUT/sp_${v}_$rep
        OUT=$OUT/sp_${v}_$rep BUILD=$bd STAGES=speed SPEED_STEPS=12 PROFILE_STEPS=1 SPEED_CONFIGS="$CFGS" \
            timeout 60 bash experiments/device_train.sh > $OUT/sp_${v}_$rep.log 2>&1; echo "speed $v $rep rc=$?"
    done
done
echo "== speed done at $(( $(date +%s) - T0 )) s"
OUT=$OUT/kern STAGES=kernels KERNEL_STEPS=2 KERNEL_TIMEOUT=60 KERNEL_CONFIGS="d768_T1024_none_nd d384_T4096_none_nd" \
    bash experiments/device_train.sh > $OUT/kernels.log 2>&1; echo "kernels rc=$?"
OUT=$OUT/par STAGES=parity bash experiments/device_train.sh > $OUT/parity.log 2>&1; echo "parity stage rc=$?"
echo "== tests done at $(( $(date +%s) - T0 )) s"
grep -E "passed|failed" $OUT/par/summary.txt
echo "speed:"; for d in sp_old_1 sp_new_1 sp_old_2 sp_new_2; do echo "[$d]"; cut -c1-150 $OUT/$d/summary.txt | tail -n +3; done
grep -E "^kernels|rmsnorm_bwd|qk_bwd|dw_reduce|\*\*all" $OUT/kern/summary.txt
(cd $OUT && tar czf /tmp/all.tgz . && rm -rf $OUT/* && mv /tmp/all.tgz $OUT/)
echo "== done at $(( $(date +%s) - T0 )) s"
