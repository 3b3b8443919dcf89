#!/bin/bash
# One GPU call: what a prefill bucket costs, now that the linear layers are the q4f16_1_gemm template
# (tensor cores at every bucket; before, dlight's CUDA cores up to 64 tokens: benchmarks/NOTES.md,
# 2026-12-08). Llama-2-7B q4f16_1 (random weights) built once per bucket set, each benched at
# prompt 8 (one call of its smallest bucket) and prompt 1000 (chunks of its largest).
# Usage (after staging, see benchmarks/device_env.sh): bash benchmarks/device_prefill_buckets.sh
source benchmarks/device_env.sh || exit 3
echo "device: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)  date: $(date -u +%FT%TZ)" | tee -a "$OUT/run.log"
for buckets in ${BUCKETS:-16 64 128 256 16,64,256}; do
  dir=/tmp/m7_${buckets//,/_}
  TAIL=1 step timeout 150 python3 -m shardtune build --model llama2-7b --random-weights --arch sm_90 \
    --prefill-buckets $buckets --db database/reference/sm_90.jsonl -o $dir
  for prompt in 8 1000; do
    TAIL=1 step timeout 120 python3 -m shardtune bench $dir --prompt-len $prompt --gen-len 16 --repeat 3 \
      --json /tmp/prefill_${buckets//,/_}_p$prompt.json
  done
done
python3 benchmarks/collect_bench.py "$OUT/prefill_buckets.json" /tmp/prefill_*.json --prefix prefill_ | tee -a "$OUT/run.log"
