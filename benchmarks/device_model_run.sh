#!/bin/bash
# One device call: GPU tests of the new kernels and the model, a short Llama-2-7B tune of every
# kernel kind, then a build from that database and a benchmark. Everything lands in $OUT.
# Usage (after staging TVM, see benchmarks/device_env.sh): bash benchmarks/device_model_run.sh
source benchmarks/device_env.sh
DEV=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "device: $DEV  date: $(date -u +%FT%TZ)" | tee "$OUT/run.log"
step timeout 200 python3 -m pytest -q -x tests/gpu -k "attention or rope or norm or model"
step timeout 180 python3 -m shardtune tune --arch sm_90 --model llama2-7b --shards 1 --kernels gemv,norm,attention \
  --time-budget 150 --trials-per-kernel 32 --db "$OUT/h100.db" --no-progress
step timeout 150 python3 -m shardtune build --model llama2-7b --random-weights --quant q4f16_1 --arch sm_90 \
  --db "$OUT/h100.db" -o /tmp/llama2-7b-q4
step timeout 120 python3 -m shardtune bench /tmp/llama2-7b-q4 --prompt-len 8 --gen-len 256 --repeat 3 \
  --json "$OUT/bench_llama2-7b_q4f16_1_tp1.json"
python3 -m shardtune db export "$OUT/h100.db" -o "$OUT/tune_llama2-7b_tp1_h100.jsonl" 2>/dev/null
