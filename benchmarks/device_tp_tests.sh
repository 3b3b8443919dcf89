#!/bin/bash
# On a 2-GPU machine: the GPU tests of the fused all-reduce (one GPU standing in for all, then
# TP2 models against TP1 on the same weights). Log in $OUT/tests.log.
source benchmarks/device_env.sh >/dev/null 2>&1
echo "device: $(nvidia-smi -L | wc -l) x $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)  date: $(date -u +%FT%TZ)"
LOG=tests.log TAIL=15 step timeout ${LIMIT:-400} python3 -m pytest -q -s -p no:cacheprovider \
  tests/gpu/test_allreduce_gpu.py tests/gpu/test_sharded_gpu.py -k "fused or allreduce_and"
