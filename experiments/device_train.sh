#!/usr/bin/env bash
# experiments/device_train.sh - the GPU trainer's one device call: build with the model and CUDA on, the
# GPU-vs-CPU parity test, the speed table of issue 8's configurations, and a smoke run of one experiment arm.
# Logs go to $OUT (the device tool's output folder); a short table is printed last.
#   STAGES="build parity speed smoke" (default: all; "kernels", not in the default, times every kernel of
#   KERNEL_STEPS steps of the KERNEL_CONFIGS rows with Nsight Compute), SPEED_STEPS (timed steps per config after 3 warm-up
#   steps, default 6), PROFILE_STEPS (profiled steps after those, default 2), SMOKE_STEPS (default 120),
#   ARCH (default 90a), SPEED_CONFIGS (names of the speed table's rows to run, default all).
# Speed rows: <model>_T<seq>_<depth> with the deterministic attention backward (the trainer's default);
# _nd: --deterministic-attention off (the operator's non-deterministic backward, wgmma on sm_90); _legacy: the
# first version's scalar element-wise kernels (MODA_GPU_ELEM_LEGACY=1), the same-run baseline of the fused ones.
set -u
OUT=${OUT:-/tmp/moda_out}
mkdir -p "$OUT"
STAGES=${STAGES:-"build parity speed smoke"}
ARCH=${ARCH:-90a}
BUILD=${BUILD:-/tmp/moda_build_model}
SPEED_STEPS=${SPEED_STEPS:-6}
SMOKE_STEPS=${SMOKE_STEPS:-120}
PROFILE_STEPS=${PROFILE_STEPS:-2}
has() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
summary="$OUT/summary.txt"
: > "$summary"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/device.txt" 2>&1
echo "device: $(cat "$OUT/device.txt"); $(date -u +%FT%TZ)" | tee -a "$summary"

if has build; then
    t=$(date +%s)
    { cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DMODA_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" &&
      cmake --build "$BUILD" -j16 --target moda_cli gpu_test_model_gpu gpu_test_model_kernels; } > "$OUT/build.log" 2>&1
    rc=$?
    echo "build: rc=$rc ($(( $(date +%s) - t )) s)" | tee -a "$summary"
    [ $rc -ne 0 ] && { tail -30 "$OUT/build.log"; exit 1; }
fi
MODA="$BUILD/moda"

if has parity; then
    t=$(date +%s)
    # the CPU half on a few BLAS threads and one OpenMP thread (two busy-waiting pools on the same cores are
    # slow; docs/model_notes.md)
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=8 timeout 150 "$BUILD/gpu_test_model_gpu" > "$OUT/parity.log" 2>&1
    rc=$?
    echo "parity test: rc=$rc ($(( $(date +%s) - t )) s)" | tee -a "$summary"
    grep -E "gradients|train |checkpoint|FAIL|passed|failed" "$OUT/parity.log" | head -40 | tee -a "$summary"
    # the row kernels alone against a float64 reference, at the speed configurations' widths
    t=$(date +%s)
    timeout 120 "$BUILD/gpu_test_model_kernels" > "$OUT/model_kernels.log" 2>&1
    rc=$?
    echo "row-kernel test: rc=$rc ($(( $(date +%s) - t )) s)" | tee -a "$summary"
    grep -E "FAIL|cases|passed|failed" "$OUT/model_kernels.log" | head -20 | tee -a "$summary"
fi

# name | model flags | batch | seq | environment
d384="--width 384 --blocks 24 --heads 6 --kv-heads 2 --head-dim 64"
d768="--width 768 --blocks 12 --heads 12 --kv-heads 4 --head-dim 64"
nd="--deterministic-attention off"
speed_configs=(
  "d384_T4096_none|$d384 --depth none|8|4096|"
  "d384_T4096_none_nd|$d384 --depth none $nd|8|4096|"
  "d384_T4096_attnffn|$d384 --depth attn+ffn|8|4096|"
  "d384_T4096_attnffn_nd|$d384 --depth attn+ffn $nd|8|4096|"
  "d384_T1024_none|$d384 --depth none|32|1024|"
  "d384_T1024_none_nd|$d384 --depth none $nd|32|1024|"
  "d384_T1024_none_legacy|$d384 --depth none|32|1024|MODA_GPU_ELEM_LEGACY=1"
  "d384_T1024_attnffn|$d384 --depth attn+ffn|32|1024|"
  "d384_T1024_attnffn_nd|$d384 --depth attn+ffn $nd|32|1024|"
  "d768_T1024_none|$d768 --depth none|32|1024|"
  "d768_T1024_none_nd|$d768 --depth none $nd|32|1024|"
  "d768_T1024_attnffn|$d768 --depth attn+ffn|32|1024|"
  "d768_T1024_attnffn_nd|$d768 --depth attn+ffn $nd|32|1024|"
)
if has speed; then
    printf "%-22s %12s %8s  %s\n" config tok/s MFU "profile (ms per step)" | tee -a "$summary"
    for cfg in "${speed_configs[@]}"; do
        IFS='|' read -r name flags batch seq envs <<< "$cfg"
        if [ -n "${SPEED_CONFIGS:-}" ]; then
            case " $SPEED_CONFIGS " in *" $name "*) ;; *) continue ;; esac
        fi
        steps=$(( 3 + SPEED_STEPS + PROFILE_STEPS ))
        # shellcheck disable=SC2086
        env $envs timeout 60 "$MODA" train --device cuda $flags --batch "$batch" --seq "$seq" --steps "$steps" --warmup 2 \
            --lr 1e-3 --eval-every 0 --eval-batches 1 --log-every 1000 --profile "$PROFILE_STEPS" --out none \
            > "$OUT/speed_$name.log" 2>&1
        rc=$?
        tps=$(sed -n 's/.*throughput \([0-9]*\) tok\/s.*/\1/p' "$OUT/speed_$name.log")
        mfu=$(sed -n 's/.*MFU \([0-9.]*%\).*/\1/p' "$OUT/speed_$name.log")
        prof=$(sed -n 's/.*profile of [0-9]* steps (ms per step): //p' "$OUT/speed_$name.log")
        printf "%-22s %12s %8s  %s\n" "$name" "${tps:-rc=$rc}" "${mfu:--}" "${prof:-$(tail -1 "$OUT/speed_$name.log")}" | tee -a "$summary"
    done
fi

if has kernels; then
    # Per-kernel times of KERNEL_STEPS training steps of each KERNEL_CONFIGS row (names of the speed table),
    # by Nsight Compute (one metric, the card's own clocks, caches not flushed between kernels: the durations
    # the unprofiled run has, kernels serialised), as a table per step (bench/ncu_kernel_table.py).
    ksteps=${KERNEL_STEPS:-2}
    for cfg in "${speed_configs[@]}"; do
        IFS='|' read -r name flags batch seq envs <<< "$cfg"
        case " ${KERNEL_CONFIGS:-d384_T4096_none_nd} " in *" $name "*) ;; *) continue ;; esac
        t=$(date +%s)
        # shellcheck disable=SC2086
        env $envs timeout ${KERNEL_TIMEOUT:-240} ncu --csv --print-units base --metrics gpu__time_duration.sum \
            --cache-control none --clock-control none "$MODA" train --device cuda $flags --batch "$batch" --seq "$seq" \
            --steps "$ksteps" --warmup 1 --lr 1e-3 --eval-every 0 --eval-batches 1 --log-every 1000 --out none \
            > "$OUT/ncu_train_$name.csv" 2> "$OUT/ncu_train_$name.err"
        rc=$?
        echo "kernels $name ($ksteps steps): rc=$rc ($(( $(date +%s) - t )) s)" | tee -a "$summary"
        python3 bench/ncu_kernel_table.py "$OUT/ncu_train_$name.csv" --steps "$ksteps" --top 25 \
            --md "$OUT/kernels_$name.md" | tee -a "$summary"
    done
fi

if has smoke; then
    data=experiments/data
    if [ -f "$data/train.txt" ]; then
        t=$(date +%s)
        timeout 120 bash experiments/run_arms.sh --arms "post_attnffn_s1" --steps "$SMOKE_STEPS" --eval-every 40 \
            --out "$OUT/smoke" > "$OUT/smoke.log" 2>&1
        rc=$?
        echo "smoke run (post-norm attn+ffn seed 1, $SMOKE_STEPS steps): rc=$rc ($(( $(date +%s) - t )) s)" | tee -a "$summary"
        grep -E "validation loss|throughput|step +[0-9]+/" "$OUT/smoke.log" | tail -6 | tee -a "$summary"
        rm -f "$OUT"/smoke/*/ckpt.bin
    else
        echo "smoke run: no $data/train.txt (run experiments/prepare_data.sh first)" | tee -a "$summary"
    fi
fi
echo "==== summary"
cat "$summary"
