#!/bin/bash
# A 4 x H100 machine; models prebuilt on a CPU machine and carried with .device/part2:
#   .device/models         benchmarks/build_scaling_models.sh (this tree: LM head split, logits gathered)
#   .device/models_before  the same builds from the tree before (.device/base: replicated LM head,
#                          a token read after every sharded step)
# Phases, one device call each:
#   scaling: bench --scaling of every model folder (prompt 8, decode 256, median of 3)
#   compare: before and after, interleaved, same machine; tp_diag of both; 7B TP1 --read-every sweep
#   tests:   the sharded model against one GPU (TP2, TP4; nccl and fused), the fused all-reduce at
#            TP2 and TP4, then one tune per GPU for records the reference database lacks
#   profile: per-kernel CUPTI profile (GPU 0) and all-reduce latency of Llama-2-70B at 4 and 2 shards
#   tp2:     (two GPUs) bench of every TP2 model folder, then profile and tp_diag of 70B and 34B TP2
#   records: chains of `tune --missing-only` (four GPUs: one chain each; two GPUs: $JOBS and
#            $JOBS1; one GPU: one chain of it all) on databases seeded with the reference and .device/seed/*.jsonl: every kernel of
#            the shipped models at 1, 2 and 4 shards (the fused all-reduce too) without a record from
#            this GPU model yet, 7-10 s of search each; a chain starts no tune after $DEADLINE s
#            (500), and exports its database after each; MISSING= (empty) retunes kernels that
#            have records too (warm start from them)
# Usage: bash benchmarks/device_x4_h100.sh scaling|compare|tests|profile|tp2|records
# A call brings back at most 8 files: each phase's results go into $OUT/<phase>.tgz, logs beside it.
source benchmarks/device_env.sh || exit 3
R=/tmp/results-$1; mkdir -p $R
trap 'tar -czf "$OUT/$1.tgz" -C $R .' EXIT
M=.device/models B=.device/models_before
echo "device: $(nvidia-smi -L | wc -l) x $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)  date: $(date -u +%FT%TZ)" | tee -a "$OUT/run.log"
# the tree before (its runtime, and its disco workers')
mkdir -p /tmp/basepkg && ln -sfn "$PWD/.device/base" /tmp/basepkg/shardtune
before="env PYTHONPATH=/tmp/basepkg:$PYTHONPATH"
BENCH="python3 -m shardtune bench --prompt-len 8 --gen-len 256 --repeat 3"
case $1 in
scaling)
  TAIL=16 step timeout 560 $BENCH --scaling $(ls -d $M/*/ | sort -V) --json "$R/scaling_x4.json" ;;
compare)
  for d in llama2-70b-q4f16_1-tp2 llama2-70b-q4f16_1-tp4 codellama-34b-q4f16_1-tp2 llama2-7b-q4f16_1-tp4; do
    TAIL=1 step timeout 90 $before $BENCH $B/$d --json "$R/before_$d.json"
    TAIL=1 step timeout 90 $BENCH $M/$d --json "$R/after_$d.json"
  done
  for d in llama2-70b-q4f16_1-tp4 llama2-7b-q4f16_1-tp4; do
    TAIL=3 step timeout 60 $before python3 benchmarks/tp_diag.py $B/$d --json "$R/tp_diag_before_$d.json"
    TAIL=3 step timeout 60 python3 benchmarks/tp_diag.py $M/$d --json "$R/tp_diag_after_$d.json"
  done
  for n in 1 8 16 32; do
    TAIL=1 step timeout 40 $BENCH $M/llama2-7b-q4f16_1-tp1 --read-every $n --json "$R/read_every_$n.json"
  done ;;
tests)
  LOG=tests.log TAIL=14 step timeout 300 python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_sharded_gpu.py
  for n in 2 4; do
    TAIL=6 step timeout 150 python3 benchmarks/allreduce_fusion.py --shards $n --hidden 8192 --json "$R/allreduce_fusion_tp$n.json"
  done
  g=0
  for job in llama2-13b:1 llama3-8b:1 llama2-70b:1 codellama-34b:1; do
    IFS=: read m s <<< "$job"
    (CUDA_VISIBLE_DEVICES=$g timeout 200 python3 -m shardtune tune --arch sm_90 --model $m --shards $s \
       --kernels gemv,norm,attention --time-budget 170 --db /tmp/tune_$m-tp$s.db --no-progress > $R/tune_$m-tp$s.log 2>&1
     python3 -m shardtune db export /tmp/tune_$m-tp$s.db -o $R/tune_$m-tp$s.jsonl >/dev/null 2>&1) &
    g=$((g + 1))
  done
  wait
  tail -n 14 $R/tune_*.log ;;
profile)
  for d in llama2-70b-q4f16_1-tp4 llama2-70b-q4f16_1-tp2; do
    TAIL=30 step timeout 120 python3 benchmarks/decode_profile.py $M/$d --json "$R/profile_$d.json"
    TAIL=8 step timeout 60 python3 benchmarks/tp_diag.py $M/$d --json "$R/tp_diag_$d.json"
  done ;;
tp2)
  TAIL=12 step timeout 250 $BENCH --scaling $(ls -d $M/*-tp2/ | sort -V) --json "$R/scaling_tp2.json"
  for d in llama2-70b-q4f16_1-tp2 codellama-34b-q4f16_1-tp2; do
    TAIL=30 step timeout 90 python3 benchmarks/decode_profile.py $M/$d --json "$R/profile_$d.json"
    TAIL=8 step timeout 45 python3 benchmarks/tp_diag.py $M/$d --json "$R/tp_diag_$d.json"
  done ;;
records)   # one GPU: one chain of every job, most-used models first; run it again to go on
  chain() {   # GPU MODEL:SHARDS:SECONDS...
    local g=$1 db=/tmp/chain$1.db; shift
    for f in database/reference/sm_90.jsonl .device/seed/*.jsonl; do
      [ -f $f ] && python3 -m shardtune db import $db $f > /dev/null
    done
    for job in "$@"; do
      [ $SECONDS -lt ${DEADLINE:-500} ] || break
      IFS=: read m s t <<< "$job"
      CUDA_VISIBLE_DEVICES=$g timeout $((t + 90)) python3 -m shardtune tune --arch sm_90 --model $m --shards $s --builders 15 \
        --kernels ${KERNELS:-gemv,norm,attention,allreduce} --time-budget $t ${MISSING---missing-only} --db $db --no-progress >> $R/chain$g.log 2>&1
      echo "   $m x$s rc=$? at $SECONDS s" >> $R/chain$g.log
      python3 -m shardtune db export $db -o $R/chain$g.jsonl > /dev/null 2>&1
    done
  }
  if [ "$(nvidia-smi -L | wc -l)" -ge 4 ]; then
    chain 0 llama2-7b:1:15 llama2-7b:2:120 llama2-7b:4:110 codellama-34b:4:50 &
    chain 1 llama2-13b:1:100 llama2-13b:2:100 llama2-13b:4:95 &
    chain 2 llama3-8b:1:80 llama3-8b:2:90 llama3-8b:4:100 &
    chain 3 codellama-34b:1:90 llama2-70b:1:35 codellama-34b:2:35 llama3-70b:1:25 llama3-70b:2:30 llama3-70b:4:30 &
    wait
  elif [ "$(nvidia-smi -L | wc -l)" -ge 2 ] && [ -n "$JOBS1" ]; then
    chain 0 $JOBS &
    chain 1 $JOBS1 &
    wait
  elif [ -n "$JOBS" ]; then   # the rest of a chain, on a warm machine
    chain 0 $JOBS
  else
    chain 0 llama2-70b:1:60 codellama-34b:1:35 llama2-13b:1:70 llama3-8b:1:50 llama3-70b:1:15 llama2-7b:1:8 \
      llama2-70b:4:30 llama2-70b:2:15 codellama-34b:2:15 codellama-34b:4:20 llama3-70b:2:15 llama3-70b:4:15 \
      llama2-7b:2:75 llama2-7b:4:70 llama2-13b:2:75 llama2-13b:4:70 llama3-8b:2:55 llama3-8b:4:60
  fi
  tail -n 4 $R/chain*.log ;;
*) echo "usage: $0 scaling|compare|tests|profile|tp2|records"; exit 2 ;;
esac
