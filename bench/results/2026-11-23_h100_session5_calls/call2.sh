#!/usr/bin/env bash
# session 5 calls 2 and 3 (tree 9e691b6 + these scripts): the layer-number experiment at 1600 steps per run
# (52.4 M tokens), non-deterministic attention backward. ARMS names the runs of this call.
set -u
T0=$(date +%s)
M=/tmp/moda_build_model/moda
if [ ! -x $M ]; then OUT=$OUT/train STAGES=build bash experiments/device_train.sh > $OUT/build.log 2>&1; echo "build rc=$?"; fi
sha256sum experiments/data/train.txt experiments/data/val.txt | tee $OUT/data_sha256.txt
mkdir -p /tmp/e/runs
timeout $(( 575 - ($(date +%s) - T0) )) bash experiments/run_arms.sh --steps 1600 --deterministic-attention off --out /tmp/e/runs \
    --moda $M --arms "$ARMS" > $OUT/arms_${TAG}.log 2>&1; echo "arms rc=$?"
grep -E "^== |validation loss|throughput" $OUT/arms_${TAG}.log | tail -30
rm -f /tmp/e/runs/*/ckpt.bin
(cd /tmp/e/runs && tar czf $OUT/runs_${TAG}.tgz $ARMS)
echo "== done at $(( $(date +%s) - T0 )) s"
