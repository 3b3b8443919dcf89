#!/bin/bash
# One call on a 4-GPU machine: four tune chains at once, one per GPU, into one database
# (/tmp/h100.db, exported to $OUT). Per-shard shapes need no peers, so each GPU tunes alone.
# Usage: bash benchmarks/device_x4_tune.sh
source benchmarks/device_env.sh || exit 3
export DB=/tmp/h100.db TRIALS=64 BUILDERS=15
chain() {
  local gpu=$1; shift
  CUDA_VISIBLE_DEVICES=$gpu OUT=$OUT/gpu$gpu bash benchmarks/device_tune_tp.sh "$*" > "$OUT/gpu$gpu.log" 2>&1
}
chain 0 "llama2-7b:1:190 llama2-7b:2:80:gemv,attention llama2-7b:4:60:gemv,attention" &
chain 1 "llama2-70b:2:240 llama2-70b:4:110" &
chain 2 "codellama-34b:2:200:gemv codellama-34b:4:130:gemv" &
chain 3 "llama2-70b:1:200:gemv,attention codellama-34b:1:140:gemv" &
wait
python3 -m shardtune db export "$DB" -o "$OUT/tune_h100_x4.jsonl"
cp "$DB" "$OUT/"
