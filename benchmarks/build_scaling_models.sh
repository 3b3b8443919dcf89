#!/bin/bash
# Build the random-weight models of the scaling runs (7B, 34B, 70B q4f16_1 at 1, 2 and 4 shards, and
# 70B q0f16 at 4) for sm_90 from the shipped reference records measured on the H100, JOBS at a
# time. No GPU needed: only the compiled library and the config travel to the GPU machine.
# Usage: bash benchmarks/build_scaling_models.sh OUT_DIR [JOBS]
M=${1:?usage: build_scaling_models.sh OUT_DIR [JOBS]} J=${2:-2}
mkdir -p "$M"
build() {   # MODEL QUANT SHARDS
  python3 -m shardtune build --model $1 --random-weights --quant $2 --arch sm_90 --shards $3 \
    --prefill-buckets 16 --db database/reference/sm_90.jsonl --device "NVIDIA H100 80GB HBM3" \
    -o "$M/$1-$2-tp$3" > "$M/build_$1-$2-tp$3.log" 2>&1
}
export -f build; export M
echo llama2-70b:q4f16_1:2 llama2-70b:q4f16_1:4 codellama-34b:q4f16_1:2 llama2-70b:q0f16:4 \
     llama2-70b:q4f16_1:1 codellama-34b:q4f16_1:4 codellama-34b:q4f16_1:1 llama2-7b:q4f16_1:1 \
     llama2-7b:q4f16_1:2 llama2-7b:q4f16_1:4 | tr ' :' '\n ' | xargs -P "$J" -L1 bash -c 'build $0 $1 $2'
grep -h "^built\|rror" "$M"/build_*.log
