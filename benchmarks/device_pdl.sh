#!/bin/bash
# Programmatic dependent launch on one GPU machine: the same model built with --pdl on and off
# (.device/pdl/<model>-pdlon, -pdloff, built on a CPU machine), one call, per model:
#   greedy ids of both from the same random weights (one process each; they must agree), bench of
#   each twice, alternately, then (PROFILE=1, the default) the per-kernel profile of both.
# Usage: [PROFILE=0] bash benchmarks/device_pdl.sh   (results in $OUT/pdl.tgz, log in $OUT/run.log)
source benchmarks/device_env.sh || exit 3
R=/tmp/results-pdl; mkdir -p $R
trap 'tar -czf "$OUT/pdl.tgz" -C $R .' EXIT
echo "device: $(nvidia-smi -L | wc -l) x $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)  date: $(date -u +%FT%TZ)" | tee -a "$OUT/run.log"
BENCH="python3 -m shardtune bench --prompt-len 8 --gen-len 256 --repeat 3"
for base in $(ls -d .device/pdl/*-pdlon | sed 's/-pdlon$//' | sort -V); do
  n=$(basename $base)
  for p in on off; do
    timeout 120 python3 -c "import json, sys, shardtune
print(json.dumps(shardtune.load(sys.argv[1], seed=3).generate([1, 2, 3, 4, 5], max_new_tokens=64, stop_at_eos=False)))" \
      $base-pdl$p 2>> "$OUT/run.log" | tail -n 1 > $R/ids_${n}_pdl$p.json
  done
  [ -s $R/ids_${n}_pdlon.json ] && cmp -s $R/ids_${n}_pdlon.json $R/ids_${n}_pdloff.json && same=yes || same=NO
  echo "$n: greedy ids with and without PDL the same: $same" | tee -a "$OUT/run.log"
  for round in 1 2; do
    for p in off on; do
      TAIL=1 step timeout 100 $BENCH $base-pdl$p --json "$R/bench_${n}_pdl${p}_$round.json"
    done
  done
  if [ "${PROFILE:-1}" = 1 ]; then
    for p in on off; do
      TAIL=14 step timeout 90 python3 benchmarks/decode_profile.py $base-pdl$p --json "$R/profile_${n}_pdl$p.json"
    done
  fi
done
