#!/bin/bash
# Probes of the tuned GEMVs on one H100 (run from the checkout, .device staged):
#   loads:    text edits of the generated CUDA timed in one run (gemv_source_probe.py), then Nsight
#             Compute's full set of one launch of each variant of two shapes (cold caches, clocks as
#             they are) into $OUT/ncu_loads.tgz
#   dot8:     the byte-pair st_q4_dot8 against TVM's code on every shape of issue 3's bars, then ncu
#   l2pf:     the bulk L2 prefetch of a block's rows, and the loads hoisted, against TVM's code
#             on every shape of issue 3's bars (gemv_source_probe.py)
#   persist:  one wave of blocks looping over row tiles (and half a wave), against TVM's code
#   hoist:    a thread's loads written first, and forced first (hoist_dep), against TVM's code
#   lop3:     st_q4_dot8's AND and OR as one lop3, against TVM's code
#   decode:   fewer instructions a weight (lop3, interleaved nibbles) and the register cap, against
#             TVM's code (results/2026-12-07-gemv-decode/: median 0.986-1.000, nothing kept)
#   bound:    TVM's code against itself with the dequantize-and-dot math removed and every load kept
#             (nomath, nomath_x): how fast the loads alone go (prepared in session 18, not yet run)
#   pattern:  pure reads of each record's weights and scales in its access pattern, row-major (as
#             stored) and step-major, and flat (pattern_read_probe.py; prepared in session 18, not yet run)
#   knobs:    each shape's record against the changes of knobs in $TRY (gemv_knob_probe.py --try;
#             FIRST="KNOB=VALUE ..." for a knob the records lack), same run
#   space:    each shape of $SHAPES ("TEMPLATE:NxK ...") over every knob set its template accepts, then
#             the record and the 12 fastest again (gemv_knob_probe.py --space), one JSON per shape
# Usage: bash benchmarks/device_gemv_probe.sh loads|dot8|l2pf|persist|hoist|lop3|decode|bound|pattern|knobs|space
source benchmarks/device_env.sh || exit 3
echo "device: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)  date: $(date -u +%FT%TZ)" | tee -a "$OUT/run.log"
P="python3 benchmarks/gemv_source_probe.py database/reference/sm_90.jsonl"
case $1 in
loads) TAIL=40 step timeout 300 $P --json "$OUT/source_probe.json"; V=orig,w_cs,w_na,ws_cs ;;
dot8) TAIL=60 step timeout 400 $P --shapes-all --variants orig,dot8_w --json "$OUT/dot8_probe.json"; V=orig,dot8_w ;;
l2pf|persist|hoist|lop3|decode|bound)   # variants timed against TVM's code on every shape, no ncu
  V=$(case $1 in l2pf) echo orig,l2pf,hoist ;; persist) echo orig,persist,persist2 ;; hoist) echo orig,hoist,hoist_dep ;;
      lop3) echo orig,lop3 ;; bound) echo orig,nomath,nomath_x ;; decode) echo orig,lb,lop3_lb,interleave,interleave_lop3,interleave_lop3_lb ;; esac)
  if [ $1 = decode ]; then T=560 TAIL=200; else T=500 TAIL=90; fi
  step timeout $T $P --shapes-all --variants $V --json "$OUT/$1_probe.json"; exit ;;
pattern) TAIL=40 step timeout 400 python3 benchmarks/pattern_read_probe.py database/reference/sm_90.jsonl \
           --json "$OUT/pattern_read.json"; exit ;;
knobs) TAIL=40 step timeout 540 python3 benchmarks/gemv_knob_probe.py database/reference/sm_90.jsonl --builders 15 \
         --rounds 2 $(for f in $FIRST; do echo --first $f; done) --try "$TRY" --json "$OUT/knob_probe.json"; exit ;;
space) for s in $SHAPES; do
         TAIL=3 step timeout ${SECS:-270} python3 benchmarks/gemv_knob_probe.py database/reference/sm_90.jsonl \
           --builders 15 --space --keep 12 --rounds 5 --shape $s --json "$OUT/space_${s#*:}.json"
       done; exit ;;
*) echo "usage: $0 loads|dot8|l2pf|persist|hoist|lop3|decode|bound|pattern|knobs|space"; exit 2 ;;
esac
N=/tmp/ncu; mkdir -p $N
for shape in 8192x7168 8192x11008; do
  # each variant's one untimed launch follows a fill of its output: profile the GEMV kernels only
  TAIL=3 step timeout 200 ncu --clock-control none --cache-control all --set full -k regex:gemv -f -o $N/$shape \
    $P --shapes $shape --variants $V --once --json /tmp/once.json
  ncu --import $N/$shape.ncu-rep --page details > $N/$shape.details.txt 2>&1
done
grep -E "gemv_kernel|Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Issue Slots Busy|Executed Instructions  " $N/*.details.txt | head -60
tar -czf "$OUT/ncu_$1.tgz" -C $N .
