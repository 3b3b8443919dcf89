#!/bin/bash
# After a search change: `tune`'s default run of issue 3's check again (Llama-2-70B TP2 GEMVs, empty
# database, timed), then its best records and those of an earlier default run (OLD, a .jsonl export)
# re-measured side by side on this GPU, new old new old. Results in $OUT.
#   OLD=benchmarks/results/2026-11-27-budget-check-128/tune_a.jsonl bash benchmarks/device_tune_default_rerun.sh
source benchmarks/device_env.sh || exit 3
echo "device: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)  date: $(date -u +%FT%TZ)" | tee "$OUT/run.log"
t0=$SECONDS
python3 -m shardtune tune --arch sm_90 --model llama2-70b --shards 2 --kernels gemv --builders 15 --no-progress \
  --db /tmp/new.db > "$OUT/tune_new.log" 2>&1
echo "tune (default trials): rc=$? in $((SECONDS - t0)) s wall" | tee -a "$OUT/run.log" "$OUT/tune_new.log"
python3 -m shardtune db export /tmp/new.db -o "$OUT/tune_new.jsonl"
for round in 1 2; do
  for d in new old; do
    db=/tmp/new.db; [ $d = old ] && db=$OLD
    python3 -m shardtune regress --db "$db" --arch sm_90 --shards 2 --repeats 5 \
      --json "$OUT/regress_${d}_$round.json" > /dev/null 2>&1
    echo "regress $d round $round: rc=$? at $((SECONDS - t0)) s" | tee -a "$OUT/run.log"
  done
done
