#!/bin/bash
# Diagnose a sharded step on a 2-GPU machine: NCCL's chosen transport, all-reduce latency,
# step time on the GPUs vs through the controller. Usage: bash benchmarks/device_tp_diag.sh
source benchmarks/device_env.sh
nvidia-smi topo -m | head -5
python3 -m shardtune build --model llama2-7b --random-weights --quant q4f16_1 --arch sm_90 --shards 2 -o /tmp/d7 2>&1 | tail -1
NCCL_DEBUG=INFO timeout 120 python3 benchmarks/tp_diag.py /tmp/d7 --json $OUT/tp_diag_llama2-7b_tp2.json 2>&1 | grep -v -i warning | grep -i "via\|channel 00\|json\|allreduce\|step\|error\|NCCL version\|{\|}" | head -40
