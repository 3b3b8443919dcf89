#!/bin/bash
# Tune the per-shard kernels of tensor-parallel builds on one GPU (the per-shard shapes are
# known without N GPUs). Usage: [DB=PATH] [KERNELS=gemv,norm,attention] \
#   bash benchmarks/device_tune_tp.sh "MODEL:SHARDS:SECONDS[:KERNELS] ..." [warm-start.jsonl ...]
source benchmarks/device_env.sh
DB=${DB:-$OUT/tp.db}
DEV=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "device: $DEV  date: $(date -u +%FT%TZ)" | tee "$OUT/tune.log"
JOBS=$1; shift
for f in "$@"; do python3 -m shardtune db import "$DB" "$f" 2>&1 | tail -1; done
for job in $JOBS; do
  IFS=: read model shards secs kernels <<< "$job"
  echo "== tune $model TP$shards ($secs s)" | tee -a "$OUT/tune.log"
  timeout $((secs + 60)) python3 -m shardtune tune --arch sm_90 --model $model --shards $shards \
    --kernels ${kernels:-${KERNELS:-gemv,norm,attention}} --time-budget $secs --trials-per-kernel ${TRIALS:-24} ${BUILDERS:+--builders $BUILDERS} --db "$DB" --no-progress 2>&1 \
    | grep -v -i warning | tee -a "$OUT/tune.log" | tail -14
  python3 -m shardtune db export "$DB" -o "$OUT/tune_tp_h100.jsonl" 2>&1 | tail -1   # after each: a cut-off run keeps the rest
done
