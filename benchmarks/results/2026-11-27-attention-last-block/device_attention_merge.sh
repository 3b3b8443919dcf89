#!/bin/bash
# Decode attention with its partitions merged by their last block (merge="last_block"), one H100
# call: the attention GPU tests; a tune of Llama-2-7B TP1's attention on a database seeded with the
# reference (the template's edit made its attention records stale); Llama-2-7B built from it on
# the GPU as .device/ab2/<model>-after; then device_pdl.sh against <model>-before (built on a CPU
# machine from the tree before, reference records): greedy ids, bench alternately, profiles.
# Usage: bash benchmarks/device_attention_merge.sh   (results in $OUT/attn.tgz and $OUT/pdl.tgz)
source benchmarks/device_env.sh || exit 3
R=/tmp/results-attn; mkdir -p $R
trap 'tar -czf "$OUT/attn.tgz" -C $R .' EXIT
echo "device: $(nvidia-smi -L | wc -l) x $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)  date: $(date -u +%FT%TZ)" | tee -a "$OUT/run.log"
LOG=tests.log TAIL=6 step timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gemv_gpu.py -k attention
db=/tmp/attention.db
python3 -m shardtune db import $db database/reference/sm_90.jsonl > /dev/null
TAIL=8 step timeout 200 python3 -m shardtune tune --arch sm_90 --model llama2-7b --shards 1 --kernels attention \
  --missing-only --time-budget ${BUDGET:-90} --builders 15 --db $db --no-progress
python3 -m shardtune db export $db -o $R/attention_db.jsonl > /dev/null
TAIL=1 step timeout 200 python3 -m shardtune build --model llama2-7b --random-weights --quant q4f16_1 --arch sm_90 \
  --prefill-buckets 16 --db $db --device "NVIDIA H100 80GB HBM3" -o .device/ab2/llama2-7b-q4f16_1-tp1-after
cp .device/ab2/llama2-7b-q4f16_1-tp1-after/config.json $R/config_after.json
DIR=.device/ab2 A=after B=before bash benchmarks/device_pdl.sh
