#!/bin/bash
# Does NCCL's protocol choice change a sharded decode step? One prebuilt model, benched under
# each setting in turn. Usage: bash benchmarks/device_tp_nccl_env.sh MODEL_DIR
source benchmarks/device_env.sh
for setting in "" "NCCL_PROTO=LL" "NCCL_PROTO=LL NCCL_ALGO=Ring" "NCCL_MAX_NCHANNELS=2 NCCL_PROTO=LL"; do
  tag=$(echo "${setting:-default}" | tr ' =' '_-')
  env $setting python3 -m shardtune bench "$1" --gen-len 256 --repeat 3 --json "$OUT/nccl_env_$tag.json" 2>&1 | grep tok/s | sed "s/^/[$setting] /"
done
