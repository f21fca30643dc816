#!/usr/bin/env bash
# session 6, one call on nvidia-h200-x2 (tree f9a95ca + this script): the layer-number experiment with the recipe's
# current defaults (lr 1e-3, 60 MB of training text, 1600 steps of 32 x 1024 tokens per run), the 8 arms dealt
# over the two GPUs by run_arms.sh --gpus 2 in an order that balances them (each GPU: ~450 s of training).
# A background loop re-packs the logs every 20 s, so a call cut at its time limit still returns what finished.
set -u
T0=$(date +%s)
export MODA_GIT_COMMIT=f9a95ca
M=/tmp/moda_build_model/moda
OUT=$OUT/train STAGES=build bash experiments/device_train.sh > $OUT/build.log 2>&1; echo "build rc=$? at $(( $(date +%s) - T0 )) s"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
sha256sum experiments/data/train.txt experiments/data/val.txt | tee $OUT/data_sha256.txt
R=/tmp/e/runs
mkdir -p $R
pack() { (cd $R && tar czf /tmp/runs.tgz --exclude=ckpt.bin . 2>/dev/null && mv /tmp/runs.tgz $OUT/runs.tgz); }
( while sleep 20; do pack; done ) &
packer=$!
# dealt in turn over 2 GPUs: GPU0 post_attnffn_s1 pre_attnffn_s1 post_none_s1 pre_none_s1,
#                            GPU1 post_attnffn_s2 post_attn_s1 post_attn_s2 post_none_s2
ARMS="post_attnffn_s1 post_attnffn_s2 pre_attnffn_s1 post_attn_s1 post_none_s1 post_attn_s2 pre_none_s1 post_none_s2"
timeout $(( 588 - ($(date +%s) - T0) )) bash experiments/run_arms.sh --gpus 2 --steps 1600 --deterministic-attention off \
    --out $R --moda $M --arms "$ARMS" > $OUT/arms.log 2>&1; echo "arms rc=$? at $(( $(date +%s) - T0 )) s"
kill $packer; wait $packer 2>/dev/null
pack
grep -hE "^== |validation loss|throughput" $R/console_gpu*.log | tail -40
echo "== done at $(( $(date +%s) - T0 )) s"
