#!/bin/bash
# One H100 call: the TMA/PDL read probe, a tune of decode attention with the in-cluster merge in its
# knob space (warm-started from the reference), the best trial per `cluster` value, and the fused
# all-reduce's GPU tests (their PDL cases launch a cluster with PDL, as builds of both kernels do).
# Usage: bash benchmarks/device_attention_cluster.sh "MODEL:SHARDS:SECONDS ..."
source benchmarks/device_env.sh
echo "device: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)  date: $(date -u +%FT%TZ)" | tee -a "$OUT/run.log"
timeout 150 bash benchmarks/device_read_probe.sh 2>&1 | tail -8
DB=$OUT/attention.db KERNELS=attention TRIALS=${TRIALS:-128} bash benchmarks/device_tune_tp.sh "$1" database/reference/sm_90.jsonl \
  2>&1 | tail -16
python3 benchmarks/study_best_by_knob.py "$OUT/attention.studies.db" mma,cluster --template decode_attention \
  --json "$OUT/attention_best_by_cluster.json" 2>&1 | tail -12
TAIL=8 timeout ${TEST_SECS:-300} bash benchmarks/device_allreduce.sh tests
