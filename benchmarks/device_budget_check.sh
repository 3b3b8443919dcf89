#!/bin/bash
# Issue 3's search-length check on a 4-GPU machine, two calls back to back:
#   bash benchmarks/device_budget_check.sh 1   # 9 min: GPU 0 tunes Llama-2-70B TP2's GEMVs alone
#                                              # (a.db); GPUs 1-3 tune the same into one shared
#                                              # study (b.db), three times the trials
#   bash benchmarks/device_budget_check.sh 2   # 3 more minutes on b.db from all four GPUs (about
#                                              # 4.3x a.db's search), then both databases' best
#                                              # records re-measured on GPU 0, one after the other
# Not yet run. Results in $OUT: tune logs, both exports, regress_{a,b}.json, budget_check.json.
source benchmarks/device_env.sh || exit 3
TUNE="python3 -m shardtune tune --arch sm_90 --model llama2-70b --shards 2 --kernels gemv --trials-per-kernel 1000 --builders 15 --no-progress"
if [ "$1" = 1 ]; then
  (t0=$SECONDS; CUDA_VISIBLE_DEVICES=0 $TUNE --time-budget 540 --db /tmp/a.db > "$OUT/tune_a.log" 2>&1
   echo "tune a: $((SECONDS - t0)) s wall" | tee -a "$OUT/tune_a.log") &
  for g in 1 2 3; do
    (CUDA_VISIBLE_DEVICES=$g $TUNE --time-budget 540 --db /tmp/b.db > "$OUT/tune_b$g.log" 2>&1) &
  done
  wait
else
  for g in 0 1 2 3; do
    (CUDA_VISIBLE_DEVICES=$g $TUNE --time-budget 180 --db /tmp/b.db > "$OUT/tune_b_more$g.log" 2>&1) &
  done
  wait
  for d in a b; do
    python3 -m shardtune db export /tmp/$d.db -o "$OUT/tune_$d.jsonl"
    CUDA_VISIBLE_DEVICES=0 python3 -m shardtune regress --db /tmp/$d.db --arch sm_90 --shards 2 \
      --repeats 5 --json "$OUT/regress_$d.json" | tail -8
  done
  python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
now = {}
for d in "ab":
    for row in json.load(open(f"{out}/regress_{d}.json"))["rows"]:
        now.setdefault((row["template"], json.dumps(row["workload"], sort_keys=True)), {})[d] = row["now_us"]
rows = [{"template": t, "workload": json.loads(w), "short_us": v.get("a"), "long_us": v.get("b"),
         "short_over_long": v["a"] / v["b"] if v.get("a") and v.get("b") else None} for (t, w), v in now.items()]
bad = [r for r in rows if r["short_over_long"] is None or r["short_over_long"] > 1.05]
json.dump({"rows": rows, "within_5_percent": not bad}, open(f"{out}/budget_check.json", "w"), indent=1)
for r in rows:
    print(r["template"], r["workload"]["N"], r["workload"]["K"], r["short_us"], r["long_us"], r["short_over_long"])
print("every shape within 5% of the longer search:", not bad)
PY
fi
