#!/bin/bash
# The fused all-reduce on one H100: its GPU tests (one GPU standing in for all, and N ranks on one
# GPU running the real protocol), then tune runs of it at the given models and shard counts.
# Usage: bash benchmarks/device_allreduce.sh tests|tune "MODEL:SHARDS:SECONDS ..." [warm.jsonl]
source benchmarks/device_env.sh
echo "device: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)  date: $(date -u +%FT%TZ)" \
  | tee -a "$OUT/run.log"
case $1 in
  tests) step python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_allreduce_gpu.py --durations=5 ;;
  tune) shift; DB=$OUT/allreduce.db KERNELS=allreduce TRIALS=${TRIALS:-80} bash benchmarks/device_tune_tp.sh "$@" ;;
esac
