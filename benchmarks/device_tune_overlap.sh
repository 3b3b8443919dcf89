#!/bin/bash
# One H100 call: `tune` of Llama-2-7B's GEMVs from empty databases, with the next
# round's builds overlapping this round's measurements (SHARDTUNE_OVERLAP=1) and without (the default),
# each run twice in alternating order: wall time, and each kernel's best stored latency.
# 48 trials a kernel (TRIALS=), about 2 minutes a run.
# Usage (after staging, see benchmarks/device_env.sh): bash benchmarks/device_tune_overlap.sh
source benchmarks/device_env.sh || exit 3
echo "device: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)  date: $(date -u +%FT%TZ)" | tee -a "$OUT/run.log"
for run in on_1 off_1 on_2 off_2; do
  rm -f /tmp/$run.db /tmp/$run.studies.db
  overlap=$([ ${run%_*} = on ] && echo 1 || echo 0)
  t0=$SECONDS
  SHARDTUNE_OVERLAP=$overlap TAIL=8 step timeout ${SECS:-140} python3 -m shardtune tune --arch sm_90 --model llama2-7b \
    --kernels gemv --trials-per-kernel ${TRIALS:-48} --builders 15 --db /tmp/$run.db --no-progress
  echo "$run: overlap=$overlap wall $((SECONDS - t0)) s" | tee -a "$OUT/run.log"
  python3 -m shardtune db export /tmp/$run.db -o "$OUT/tune_$run.jsonl" 2>&1 | tail -1
  rm -f /tmp/$run.db* /tmp/$run.studies.db*
done
