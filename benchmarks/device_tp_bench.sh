#!/bin/bash
# On a 4-GPU machine: the sharded model against the one-GPU build (TP2, TP4), then every
# prebuilt model folder given, benchmarked (prompt 8, decode 256) into one scaling JSON.
# Builds are made beforehand on any machine (random weights: only the library travels).
# Usage: bash benchmarks/device_tp_bench.sh NAME MODEL_DIR...   (NAME names the JSON; TEST=0 skips the test)
source benchmarks/device_env.sh
NAME=$1; shift
echo "device: $(nvidia-smi -L | wc -l) x $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)  date: $(date -u +%FT%TZ)" | tee -a "$OUT/$NAME.log"
if [ "${TEST:-1}" = 1 ]; then
  timeout 280 python3 -m pytest -q -s tests/gpu/test_sharded_gpu.py 2>&1 | grep -v -i warning | tee -a "$OUT/$NAME.log" | tail -12
fi
python3 -m shardtune bench --scaling "$@" --prompt-len 8 --gen-len 256 --repeat 3 --json "$OUT/$NAME.json" 2>&1 \
  | grep -v -i warning | tee -a "$OUT/$NAME.log" | tail -30
