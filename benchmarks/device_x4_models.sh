#!/bin/bash
# One call on a 4-GPU machine after device_x4_tune.sh: build every model and shard count from
# its database at once (CPU), then bench each family across 1, 2 and 4 GPUs (bench --scaling).
# Usage: bash benchmarks/device_x4_models.sh
source benchmarks/device_env.sh || exit 3
DB=/tmp/h100.db M=/tmp/models
mkdir -p $M
JOBS="llama2-7b:q4f16_1:1 llama2-7b:q4f16_1:2 llama2-7b:q4f16_1:4 codellama-34b:q4f16_1:1 codellama-34b:q4f16_1:2
      codellama-34b:q4f16_1:4 llama2-70b:q4f16_1:1 llama2-70b:q4f16_1:2 llama2-70b:q4f16_1:4 llama2-70b:q0f16:4"
for job in $JOBS; do
  IFS=: read m q s <<< "$job"
  timeout 300 python3 -m shardtune build --model $m --random-weights --quant $q --arch sm_90 --shards $s \
    --db $DB --prefill-buckets 16 -o $M/$m-$q-tp$s > "$OUT/build_$m-$q-tp$s.log" 2>&1 &
done
wait
grep -h "^built\|Error\|error:" "$OUT"/build_*.log
for m in llama2-7b codellama-34b llama2-70b; do
  TAIL=8 step timeout 200 python3 -m shardtune bench --scaling $M/$m-q4f16_1-tp{1,2,4} --json "$OUT/scaling_$m.json"
done
TAIL=3 step timeout 120 python3 -m shardtune bench $M/llama2-70b-q0f16-tp4 --json "$OUT/bench_llama2-70b_q0f16_tp4.json"
