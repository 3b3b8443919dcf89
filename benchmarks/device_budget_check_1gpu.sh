#!/bin/bash
# Issue 3's search-length check on one H100, in calls back to back on one warm machine:
#   bash benchmarks/device_budget_check_1gpu.sh a        # A: `tune` of Llama-2-70B TP2's GEMVs as a user
#        # runs it (its default trials a kernel) from an empty database, timed; then B, the same
#        # with four times the trials, until the call's time is up
#   bash benchmarks/device_budget_check_1gpu.sh b        # B goes on where it stopped (the study resumes)
#   bash benchmarks/device_budget_check_1gpu.sh compare  # B to its end; then both databases' best records
#        # re-measured on this GPU, A B A B; budget_check.json: per kernel, A's time over B's
# LEFT: seconds a call may use (default 560; compare keeps REGRESS_S of them, default 300, for the
# re-measure). Results in $OUT: logs, both exports, budget_check.json, regress.tgz (the four
# regress JSONs in one file: a call returns at most 8 files from $OUT).
# A machine goes back after 30 minutes held, and its /tmp with it. SEED=DIR (a folder of this
# repository holding the earlier calls' $OUT: tune_a.log, tune_a.jsonl, tune_b.jsonl, run.log) goes
# on on a new one: A's records are imported, B's too, and B searches only the kernels it had not
# finished (--missing-only; the one in progress starts over).
source benchmarks/device_env.sh || exit 3
TUNE="python3 -m shardtune tune --arch sm_90 --model llama2-70b --shards 2 --kernels gemv --builders 15 --no-progress"
LEFT=${LEFT:-560}
DEFAULT=$(python3 -c "from shardtune.tuner.api import DEFAULT_TRIALS; print(DEFAULT_TRIALS['nvidia'])")
echo "device: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)  date: $(date -u +%FT%TZ)  phase $1" | tee -a "$OUT/run.log"
tune_b() {   # SECONDS: B for at most that long; its wall time is summed in /tmp/b_seconds
  local t0=$SECONDS
  timeout "$1" $TUNE --trials-per-kernel $((4 * DEFAULT)) --db /tmp/b.db >> /tmp/tune_b.log 2>&1
  local rc=$?
  echo $((SECONDS - t0)) >> /tmp/b_seconds
  echo "tune B: rc=$rc after $((SECONDS - t0)) s (124: stopped, resumes next call); $(( $(paste -sd+ /tmp/b_seconds) )) s in all" | tee -a "$OUT/run.log"
}
if [ -n "$SEED" ]; then
  if [ ! -e /tmp/a.db ]; then   # the first call on this machine
    python3 -m shardtune db import /tmp/a.db "$SEED/tune_a.jsonl" && python3 -m shardtune db import /tmp/b.db "$SEED/tune_b.jsonl" || exit 3
    cp "$SEED/tune_a.log" /tmp/tune_a.log
    grep -o '[0-9]* s in all' "$SEED/run.log" | tail -1 | cut -d' ' -f1 > /tmp/b_seconds
    echo "seeded from $SEED: B had searched $(cat /tmp/b_seconds) s" | tee -a "$OUT/run.log"
  fi
  TUNE="$TUNE --missing-only"
fi
case $1 in
a)
  t0=$SECONDS
  $TUNE --db /tmp/a.db > /tmp/tune_a.log 2>&1
  echo "tune A (default: $DEFAULT trials a kernel): rc=$? in $((SECONDS - t0)) s wall" | tee -a "$OUT/run.log" /tmp/tune_a.log
  cp /tmp/tune_a.log "$OUT/"
  tune_b $((LEFT - SECONDS)) ;;
b)
  tune_b $((LEFT - SECONDS)) ;;
compare)
  tune_b $((LEFT - ${REGRESS_S:-300} - SECONDS))
  cp /tmp/tune_a.log /tmp/tune_b.log "$OUT/"
  for d in a b; do python3 -m shardtune db export /tmp/$d.db -o "$OUT/tune_$d.jsonl"; done
  for round in 1 2; do
    for d in a b; do
      python3 -m shardtune regress --db /tmp/$d.db --arch sm_90 --shards 2 --repeats 5 \
        --json "/tmp/regress_${d}_$round.json" > /dev/null 2>&1
    done
  done
  python3 - "$OUT" <<'PY'
import json, os, statistics, sys
out, now = sys.argv[1], {}
for d in "ab":
    for rnd in (1, 2):
        for row in json.load(open(f"/tmp/regress_{d}_{rnd}.json"))["rows"]:
            key = (row["template"], json.dumps(row["workload"], sort_keys=True))
            if row["now_us"] is not None:
                now.setdefault(key, {}).setdefault(d, []).append(row["now_us"])
b_seconds = sum(int(x) for x in open("/tmp/b_seconds").read().split())
rows = []
for (t, w), v in sorted(now.items()):
    a, b = (statistics.median(v[d]) if v.get(d) else float("nan") for d in "ab")
    rows.append({"template": t, "workload": json.loads(w), "a_us": v.get("a"), "b_us": v.get("b"),
                 "a_over_b": a / b})
ok = bool(rows) and all(r["a_over_b"] <= 1.05 for r in rows)   # NaN (a failed kernel) fails
# Phase a wrote its summary line into this machine's /tmp/tune_a.log ($OUT is new in every call).
a_line = [ln for ln in open("/tmp/tune_a.log") if ln.startswith("tune A")][-1].strip()
json.dump({"device": open(f"{out}/run.log").readline().strip(), "command": "benchmarks/device_budget_check_1gpu.sh a, b, compare" + (" (then SEED=... b, compare on a new machine)" if os.environ.get("SEED") else ""),
           "tune_a": a_line, "tune_b_seconds": b_seconds, "rows": rows, "a_within_5_percent_of_b": ok},
          open(f"{out}/budget_check.json", "w"), indent=1)
for r in rows:
    print(f"{r['template']:24s} {r['workload']['N']:6d}x{r['workload']['K']:<6d} A {r['a_us']} B {r['b_us']} A/B {r['a_over_b']:.3f}")
print(a_line, f"| B searched {b_seconds} s | every kernel of A within 5% of B: {ok}")
PY
  tar czf "$OUT/regress.tgz" -C /tmp regress_a_1.json regress_b_1.json regress_a_2.json regress_b_2.json
  ;;
*) echo "usage: $0 a|b|compare"; exit 2 ;;
esac
