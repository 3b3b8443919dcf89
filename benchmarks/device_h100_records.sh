#!/bin/bash
# H100 tuning records beyond Llama-2-7B TP1, on one warm H100 (after staging TVM, see
# benchmarks/device_env.sh); the database stays in /tmp/work between calls.
#   1: Llama-2-70B TP2 attention and norms (issue 4's bars: attention at 4096 >= 70% of the copy
#      bandwidth, at 128 <= 8 us; RMSNorm with residual at H=8192 <= 4 us)
#   2: Llama-2-70B GEMVs at TP2 and TP4 (per-shard shapes: one GPU tunes them)
#   3: CodeLlama-34B GEMVs at TP2 and TP4
# Usage: bash benchmarks/device_h100_records.sh PHASE   (results: $OUT, tune logs and the export)
PHASE=${1:?phase 1, 2 or 3}
source benchmarks/device_env.sh
W=/tmp/work; mkdir -p $W
echo "device: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)  date: $(date -u +%FT%TZ)  phase $PHASE" \
  | tee -a "$OUT/run.log"
tune() {   # tune MODEL SHARDS KINDS SECONDS
  step timeout $(($4 + 60)) python3 -m shardtune tune --arch sm_90 --model $1 --shards $2 --kernels $3 \
    --time-budget $4 --trials-per-kernel 96 --db $W/h100.db --no-progress
}
case $PHASE in
1) tune llama2-70b 2 attention,norm 150 ;;
2) tune llama2-70b 2 gemv 200; tune llama2-70b 4 gemv 150 ;;
3) tune codellama-34b 2 gemv 200; tune codellama-34b 4 gemv 150 ;;
esac
python3 -m shardtune db export $W/h100.db -o "$OUT/h100_records.jsonl"
