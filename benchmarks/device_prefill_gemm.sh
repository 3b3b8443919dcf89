#!/bin/bash
# One GPU call (about 8 minutes): the prefill GEMM template (kernels/q4_gemm.py) on a GPU for the first time.
# 1. its candidates against NumPy at Llama-2-7B shapes (tests/gpu/test_prefill_kernels_gpu.py);
# 2. tune --kernels gemm for Llama-2-7B: each bucket's four linear layers against dlight's Matmul on the
#    same compute (the closing table's baseline and speedup), records into $OUT/gemm.jsonl;
# 3. the model's prefill with those records: 7B built with the default buckets, benched at prompt 8 and 1000
#    (session 23's build, a dequantize kernel and dlight's matmul: 67 ms for 8 tokens on another H100).
# Usage (after staging, see benchmarks/device_env.sh): bash benchmarks/device_prefill_gemm.sh
source benchmarks/device_env.sh || exit 3
echo "device: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)  date: $(date -u +%FT%TZ)" | tee -a "$OUT/run.log"
TAIL=30 step timeout 200 python3 -m pytest -q -s tests/gpu/test_prefill_kernels_gpu.py -k q4f16_1_gemm
TAIL=20 step timeout 240 python3 -m shardtune tune --arch sm_90 --model llama2-7b --kernels gemm \
  --trials-per-kernel ${TRIALS:-24} --db /tmp/gemm.db
python3 -m shardtune db export /tmp/gemm.db -o "$OUT/gemm.jsonl"
rm -f /tmp/gemm.db-*
python3 -m shardtune db import /tmp/model.db database/reference/sm_90.jsonl > /dev/null
python3 -m shardtune db import /tmp/model.db "$OUT/gemm.jsonl" > /dev/null
TAIL=1 step timeout 150 python3 -m shardtune build --model llama2-7b --random-weights --arch sm_90 --db /tmp/model.db -o /tmp/m7
for prompt in 8 1000; do
  TAIL=1 step timeout 100 python3 -m shardtune bench /tmp/m7 --prompt-len $prompt --gen-len 16 --repeat 3 \
    --json /tmp/prefill_gemm_p$prompt.json
done
python3 benchmarks/collect_bench.py "$OUT/prefill_gemm.json" /tmp/prefill_gemm_*.json --prefix prefill_gemm_ | tee -a "$OUT/run.log"
