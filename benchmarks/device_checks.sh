#!/bin/bash
# One call on a 1-GPU machine: GPU tests of the embedding/prefill/norm templates; `regress` on
# the reference records, then again with a deliberately slowed GEMV schedule (it must say
# slower and exit 1); a CUDA tuning run through a TVM RPC tracker and server. Results in $OUT.
source benchmarks/device_env.sh
echo "device: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)  date: $(date -u +%FT%TZ)" | tee "$OUT/checks.log"
LOG=checks.log TAIL=20
step timeout 150 python3 -m pytest -q tests/gpu/test_prefill_kernels_gpu.py tests/gpu/test_gemv_gpu.py -k "norm or prefill or embedding"
REF=database/reference/sm_90.jsonl
step timeout 100 python3 -m shardtune regress --db $REF --shards 4 --template q4f16_1_gemv --json "$OUT/regress_clean.json"
cp kernels/gemv_schedule.py /tmp/gemv_schedule.py.orig
sed -i 's/^    if vec > 1:  # at vec=1/    if False:  # DELIBERATELY SLOWED (weight loads not vectorized); was: if vec > 1:  # at vec=1/' kernels/gemv_schedule.py
grep -n "DELIBERATELY" kernels/gemv_schedule.py | tee -a "$OUT/checks.log"
step timeout 100 python3 -m shardtune regress --db $REF --shards 4 --template q4f16_1_gemv --json "$OUT/regress_slowed.json"
cp /tmp/gemv_schedule.py.orig kernels/gemv_schedule.py
TAIL=30 step timeout 200 bash benchmarks/rpc_tune_device.sh "$OUT/rpc.db" --time-budget 60
