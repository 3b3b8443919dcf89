#!/bin/bash
# One device call on a 2- or 4-GPU machine: the CCL backend and the sharded model against
# the one-GPU build (tests/gpu/test_sharded_gpu.py), then random-weight builds at every
# shard count the machine has, benchmarked (prompt 8, decode 256). Everything lands in $OUT.
# Usage: bash benchmarks/device_tp_run.sh [DB.jsonl ...]   (records to build with; optional)
source benchmarks/device_env.sh
GPUS=$(nvidia-smi -L | wc -l)
DEV=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "device: $GPUS x $DEV  date: $(date -u +%FT%TZ)" | tee "$OUT/run.log"
DB=/tmp/tp.db
for f in "$@"; do python3 -m shardtune db import "$DB" "$f" >/dev/null 2>&1; done
step timeout ${TEST_S:-240} python3 -m pytest -q -x -s tests/gpu/test_sharded_gpu.py
for spec in ${BENCH:-llama2-70b:q4f16_1 codellama-34b:q4f16_1 llama2-7b:q4f16_1}; do
  model=${spec%%:*}; quant=${spec##*:}
  for tp in ${SHARDS:-2}; do
    [ "$tp" -gt "$GPUS" ] && continue
    dir=/tmp/m-$model-$quant-tp$tp
    step timeout 200 python3 -m shardtune build --model $model --random-weights --quant $quant --arch sm_90 \
      --shards $tp --db $DB -o $dir
    step timeout 150 python3 -m shardtune bench $dir --prompt-len 8 --gen-len 256 --repeat 3 \
      --json "$OUT/bench_${model}_${quant}_tp${tp}.json"
  done
done
