#!/usr/bin/env bash
# session 5 call 5 (tree 9e691b6 + these scripts): a probe with the session's last device minutes. The
# 1600-step post-norm baselines diverged at lr 2e-3 (calls 2-3); does post-norm none train stably at lr 1e-3,
# and where does attn+ffn land there? One seed each, the same data and steps.
set -u
T0=$(date +%s)
OUT0=$OUT
( OUT=$OUT0/train STAGES=build bash experiments/device_train.sh > /tmp/build.log 2>&1; echo "build rc=$? at $(( $(date +%s) - T0 )) s" )
for arm in post_none_s1 post_attnffn_s1; do
    timeout $(( 330 - ($(date +%s) - T0) )) bash experiments/run_arms.sh --steps 1600 --lr 1e-3 --deterministic-attention off \
        --out /tmp/p --moda /tmp/moda_build_model/moda --arms $arm > $OUT0/probe_${arm}.log 2>&1
    echo "$arm rc=$? at $(( $(date +%s) - T0 )) s"
    cp /tmp/p/$arm/log.jsonl $OUT0/probe_${arm}.jsonl 2>/dev/null
    grep -E "validation loss" $OUT0/probe_${arm}.log | tail -4
done
