#!/bin/bash
# On a 2-GPU machine with prebuilt fused TP2 models (random weights) in MODELS_DIR: the fused
# all-reduce kernel (both protocols, every knob) against NCCL + add+norm; then each model's
# fused decode against its NCCL decode on the same weights (ids, logits, tok/s). Results in $OUT.
# Usage: bash benchmarks/device_tp_fused.sh MODELS_DIR
source benchmarks/device_env.sh >/dev/null 2>&1
M=$1
echo "device: $(nvidia-smi -L | wc -l) x $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)  date: $(date -u +%FT%TZ)"
LOG=fused.log TAIL=8 step timeout 170 python3 benchmarks/allreduce_fusion.py --hidden 4096 8192 \
  --json "$OUT/allreduce_fusion_tp2.json"
LOG=fused.log TAIL=12 step timeout ${LIMIT:-330} python3 -u benchmarks/tp_fused_check.py --check $M/llama2-7b-fused-tp2 \
  $M/llama2-70b-fused-tp2 $M/codellama-34b-fused-tp2 $M/llama2-7b-fused-tp2 --json "$OUT/tp2_fused.json"
