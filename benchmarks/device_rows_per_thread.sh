#!/bin/bash
# The GEMV knob rows_per_thread on one H100 (run from the checkout, .device staged):
#   probe: every issue-3 shape's best record against its 2 and 4 rows-a-thread variants, same run
#   tune:  chains of `tune --kernels gemv` over the reference, warm-started from its records,
#          JOBS="MODEL:SHARDS:SECONDS ..." (device_x4_h100.sh records, MISSING= KERNELS=gemv)
# Usage: bash benchmarks/device_rows_per_thread.sh probe|tune
source benchmarks/device_env.sh || exit 3
echo "device: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)  date: $(date -u +%FT%TZ)" | tee -a "$OUT/run.log"
case $1 in
probe) TAIL=40 step timeout 500 python3 benchmarks/gemv_rows_per_thread.py database/reference/sm_90.jsonl \
         --builders 15 --json "$OUT/rows_per_thread.json" ;;
tune) MISSING= KERNELS=gemv exec bash benchmarks/device_x4_h100.sh records ;;
*) echo "usage: $0 probe|tune"; exit 2 ;;
esac
