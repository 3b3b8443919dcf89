#!/bin/bash
# On a 2-GPU machine, prebuilt models (random weights): the fused all-reduce against NCCL on
# the same Llama-2-7B TP2 weights, then benches of fused TP2 builds. Results in $OUT.
# Usage: bash benchmarks/device_tp_fused.sh MODELS_DIR
source benchmarks/device_env.sh >/dev/null 2>&1
M=$1
echo "device: $(nvidia-smi -L | wc -l) x $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)  date: $(date -u +%FT%TZ)"
timeout ${LIMIT:-100} python3 benchmarks/tp_fused_check.py $M/llama2-7b-nccl-tp2 $M/llama2-7b-fused-tp2 \
  --bench $M/llama2-70b-fused-tp2 $M/codellama-34b-fused-tp2 $M/llama2-7b-fused-tp2 --json "$OUT/tp2_fused.json" 2>&1 \
  | grep -v -i warning | tail -20
