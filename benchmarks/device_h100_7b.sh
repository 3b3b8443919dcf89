#!/bin/bash
# Llama-2-7B on one H100, in device calls on one warm machine (after staging TVM, see
# benchmarks/device_env.sh); models and the tuning database stay in /tmp/work between calls.
#   1: GPU model tests; builds from the shipped reference database, benched with the greedy
#      argmax on the GPU and on the host (same build, same run)
#   2: an H100 tune of the 7B q4f16_1 GEMVs (seeded with the reference's H100 records)
#   3: its build, bench and per-kernel profile; the 7B q0f16 GEMVs tuned into the same database,
#      that build and bench
#   4: Llama-2-70B TP2 attention and norms tuned (issue 4's bars; not run yet)
# Session 7, the RMSNorm folded into the QKV and gate/up GEMVs:
#   5: GPU tests of those templates and of the model
#   6: the 7B q4f16_1 GEMVs tuned again (seeded with the reference's H100 records)
#   7: that build, bench and profile; in the same call the build before this session (the tree of
#      the commit before, staged in .device/base) from the reference database, benched
#   8: the argmax kernel loading its logits in chunks, and greedy tokens read 8 steps at a time: a
#      build from the reference database, its ids against the host's argmax, bench and profile,
#      beside the build before (.device/base) in the same call
#   9: the QKV GEMV with RoPE and the KV append in its epilogue: its GPU test, then as phase 8
#      (the build before: the commit before it)
#  10 (not run yet: no device time left): one build from the reference database, benched reading
#      its greedy tokens every 1, 8, 16, 32 steps, then 1 and 8 again (bench --read-every)
# Usage: bash benchmarks/device_h100_7b.sh PHASE   (results: $OUT/phaseN.tar.gz)
PHASE=${1:?phase 1 to 10}
source benchmarks/device_env.sh
W=/tmp/work; mkdir -p $W
DEV=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "device: $DEV  date: $(date -u +%FT%TZ)  phase $PHASE" | tee -a "$OUT/run.log"
st() { python3 -m shardtune "$@"; }
bench2() {   # bench2 MODEL_DIR NAME: device argmax, then host argmax, on the same build
  step timeout 90 python3 -m shardtune bench "$1" --json "$OUT/bench_${2}_device_argmax.json"
  step timeout 90 python3 -m shardtune bench "$1" --host-argmax --json "$OUT/bench_${2}_host_argmax.json"
}
tune_7b_seeded() {   # tune_7b_seeded SECONDS TRIALS: the 7B q4f16_1 GEMVs, into a database seeded with the
  # reference's H100 records (norms, RoPE, attention)
  python3 - <<'EOF'
import json
with open("/tmp/work/h100_seed.jsonl", "w") as out:
    for line in open("database/reference/sm_90.jsonl"):
        if "H100" in json.loads(line)["device"]:
            out.write(line)
EOF
  st db import $W/h100.db $W/h100_seed.jsonl
  step timeout $(($1 + 60)) python3 -m shardtune tune --arch sm_90 --model llama2-7b --shards 1 --kernels gemv \
    --time-budget $1 --trials-per-kernel $2 --db $W/h100.db --no-progress
  st db export $W/h100.db -o "$OUT/h100_db.jsonl"
}
against_before() {   # against_before NAME [BUILD ARGS]: this tree's 7B q4f16_1 build (ids against the host's
  # argmax, bench, profile) and the tree before's (.device/base, reference database), benched in one call
  local now=$W/7b-q4-$1 before=$W/7b-q4-before json="$OUT/bench_llama2-7b_q4f16_1"; shift
  step timeout 200 python3 -m shardtune build --model llama2-7b --random-weights --quant q4f16_1 --arch sm_90 "$@" -o $now
  step timeout 60 python3 -c "import shardtune, sys; m = shardtune.load(sys.argv[1]); p = list(range(1, 9)); d = m.generate(p, max_new_tokens=21); h, _ = m.generate(p, max_new_tokens=21, return_logits=True); print('device ids == host ids:', d == h, d); sys.exit(d != h)" $now
  step timeout 60 python3 -m shardtune bench $now --json "${json}_${now##*-q4-}.json"
  step timeout 60 python3 benchmarks/decode_profile.py $now --json "$OUT/profile_llama2-7b_q4f16_1_${now##*-q4-}.json"
  mkdir -p /tmp/basepkg && ln -sfn "$PWD/.device/base" /tmp/basepkg/shardtune
  step timeout 200 env PYTHONPATH=/tmp/basepkg:$PYTHONPATH python3 -m shardtune build --model llama2-7b --random-weights \
    --quant q4f16_1 --arch sm_90 -o $before
  step timeout 60 env PYTHONPATH=/tmp/basepkg:$PYTHONPATH python3 -m shardtune bench $before --json "${json}_before.json"
  step timeout 60 python3 -m shardtune bench $now --json "${json}_${now##*-q4-}_again.json"
}
case $PHASE in
1)
  step timeout 240 python3 -m pytest -q -x tests/gpu/test_model_gpu.py
  for q in q4f16_1 q0f16; do
    step timeout 150 python3 -m shardtune build --model llama2-7b --random-weights --quant $q --arch sm_90 -o $W/7b-$q-ref
    bench2 $W/7b-$q-ref llama2-7b_${q}_ref
  done ;;
2) tune_7b_seeded 360 128 ;;
3)   # a 7B build takes 100-130 s on this machine
  step timeout 200 python3 -m shardtune build --model llama2-7b --random-weights --quant q4f16_1 --arch sm_90 \
    --db $W/h100.db -o $W/7b-q4f16_1-h100
  step timeout 60 python3 -m shardtune bench $W/7b-q4f16_1-h100 --json "$OUT/bench_llama2-7b_q4f16_1_h100db_device_argmax.json"
  step timeout 60 python3 benchmarks/decode_profile.py $W/7b-q4f16_1-h100 --json "$OUT/profile_llama2-7b_q4f16_1_h100db.json"
  step timeout 150 python3 -m shardtune tune --arch sm_90 --model llama2-7b --shards 1 --quant q0f16 --kernels gemv \
    --time-budget 110 --trials-per-kernel 64 --db $W/h100.db --no-progress
  step timeout 150 python3 -m shardtune build --model llama2-7b --random-weights --quant q0f16 --arch sm_90 \
    --db $W/h100.db -o $W/7b-q0f16-h100
  step timeout 60 python3 -m shardtune bench $W/7b-q0f16-h100 --json "$OUT/bench_llama2-7b_q0f16_h100db_device_argmax.json"
  st db export $W/h100.db -o "$OUT/h100_db.jsonl" ;;
4)
  step timeout 170 python3 -m shardtune tune --arch sm_90 --model llama2-70b --shards 2 --kernels attention,norm \
    --time-budget 120 --trials-per-kernel 48 --db $W/h100.db --no-progress
  st db export $W/h100.db -o "$OUT/h100_db.jsonl" ;;
5)
  step timeout 250 python3 -m pytest -q -x tests/gpu/test_gemv_gpu.py -k "norm"
  step timeout 300 python3 -m pytest -q -x tests/gpu/test_model_gpu.py ;;
6) tune_7b_seeded 420 160 ;;
7) against_before fused_norm --db $W/h100.db ;;
8) against_before chunked_argmax ;;
9) step timeout 200 python3 -m pytest -q -x tests/gpu/test_gemv_gpu.py -k "gemv_rope"
   against_before rope_in_qkv ;;
10)
  step timeout 200 python3 -m shardtune build --model llama2-7b --random-weights --quant q4f16_1 --arch sm_90 -o $W/7b-q4
  for n in 1 8 16 32 1 8; do
    f="$OUT/bench_llama2-7b_q4f16_1_read_every_$n.json"; [ -e "$f" ] && f="${f%.json}_again.json"
    step timeout 60 python3 -m shardtune bench $W/7b-q4 --read-every $n --json "$f"
  done ;;
esac
tar czf "$OUT/phase$PHASE.tar.gz" -C "$OUT" --exclude="phase*.tar.gz" .
