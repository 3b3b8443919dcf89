#!/bin/bash
# Two builds of the same model side by side on one GPU machine, one call: $DIR/<model>-$A and
# $DIR/<model>-$B (built on a CPU machine; default .device/pdl/<model>-pdlon and -pdloff), per model:
#   greedy ids of both from the same random weights (one process each; they must agree), bench of
#   each twice, alternately, then (PROFILE=1, the default) the per-kernel profile of both.
# Usage: [DIR=.device/pdl A=pdlon B=pdloff] [PROFILE=0] bash benchmarks/device_pdl.sh
#   (results in $OUT/pdl.tgz, log in $OUT/run.log)
source benchmarks/device_env.sh || exit 3
DIR=${DIR:-.device/pdl} A=${A:-pdlon} B=${B:-pdloff}
R=/tmp/results-pdl; mkdir -p $R
trap 'tar -czf "$OUT/pdl.tgz" -C $R .' EXIT
echo "device: $(nvidia-smi -L | wc -l) x $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)  date: $(date -u +%FT%TZ)" | tee -a "$OUT/run.log"
BENCH="python3 -m shardtune bench --prompt-len 8 --gen-len 256 --repeat 3"
for base in $(ls -d $DIR/*-$A | sed "s/-$A\$//" | sort -V); do
  n=$(basename $base)
  for v in $A $B; do
    timeout 120 python3 -c "import json, sys, shardtune
print(json.dumps(shardtune.load(sys.argv[1], seed=3).generate([1, 2, 3, 4, 5], max_new_tokens=64, stop_at_eos=False)))" \
      $base-$v 2>> "$OUT/run.log" | tail -n 1 > $R/ids_${n}_$v.json
  done
  [ -s $R/ids_${n}_$A.json ] && cmp -s $R/ids_${n}_$A.json $R/ids_${n}_$B.json && same=yes || same=NO
  echo "$n: greedy ids of $A and $B the same: $same" | tee -a "$OUT/run.log"
  for round in 1 2; do
    for v in $B $A; do
      TAIL=1 step timeout 100 $BENCH $base-$v --json "$R/bench_${n}_${v}_$round.json"
    done
  done
  if [ "${PROFILE:-1}" = 1 ]; then
    for v in $A $B; do
      TAIL=14 step timeout 90 python3 benchmarks/decode_profile.py $base-$v --json "$R/profile_${n}_$v.json"
    done
  fi
done
