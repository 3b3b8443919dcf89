#!/bin/bash
# The prefill GEMM template (kernels/q4_gemm.py) on a GPU for the first time, in two calls on one machine:
#   bash benchmarks/device_prefill_gemm.sh tune    (about 8 minutes)
#     1. its candidates against NumPy at Llama-2-7B shapes (tests/gpu/test_prefill_kernels_gpu.py), and a
#        tiny model's prefill against its decode step (tests/gpu/test_prefill_model_gpu.py);
#     2. tune --kernels gemm for Llama-2-7B: each bucket's four linear layers against dlight's Matmul on the
#        same compute (the closing table's baseline and speedup), records into $OUT/gemm.jsonl;
#   bash benchmarks/device_prefill_gemm.sh model   (about 5 minutes)
#     3. 7B built with the default buckets from the reference plus those records, benched at prompt 8 and
#        1000 (session 23's build, a dequantize kernel and dlight's matmul: 67 ms for 8 tokens, another H100).
# Usage (after staging, see benchmarks/device_env.sh).
source benchmarks/device_env.sh || exit 3
echo "device: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)  date: $(date -u +%FT%TZ)" | tee -a "$OUT/run.log"
case "${1:-tune}" in
tune)
  TAIL=30 step timeout 240 python3 -m pytest -q -s tests/gpu/test_prefill_kernels_gpu.py -k q4f16_1_gemm \
    tests/gpu/test_prefill_model_gpu.py
  TAIL=20 step timeout 260 python3 -m shardtune tune --arch sm_90 --model llama2-7b --kernels gemm \
    --trials-per-kernel ${TRIALS:-24} --time-budget 240 --db /tmp/gemm.db
  python3 -m shardtune db export /tmp/gemm.db -o "$OUT/gemm.jsonl" && cp "$OUT/gemm.jsonl" /tmp/gemm.jsonl
  rm -f /tmp/gemm.db-* ;;
model)
  rm -f /tmp/model.db
  python3 -m shardtune db import /tmp/model.db database/reference/sm_90.jsonl > /dev/null
  python3 -m shardtune db import /tmp/model.db /tmp/gemm.jsonl > /dev/null
  TAIL=3 step timeout 150 python3 -m shardtune build --model llama2-7b --random-weights --arch sm_90 \
    --db /tmp/model.db -o /tmp/m7
  for prompt in 8 1000; do
    TAIL=1 step timeout 100 python3 -m shardtune bench /tmp/m7 --prompt-len $prompt --gen-len 16 --repeat 3 \
      --json /tmp/prefill_gemm_p$prompt.json
  done
  python3 benchmarks/collect_bench.py "$OUT/prefill_gemm.json" /tmp/prefill_gemm_*.json --prefix prefill_gemm_ \
    | tee -a "$OUT/run.log"
  rm -f /tmp/model.db-* ;;
*) echo "usage: $0 tune|model" >&2; exit 2 ;;
esac
