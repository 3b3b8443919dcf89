#!/bin/bash
# One H100 call: the first whole model whose decode attention merges inside a cluster.
# - the GPU test of the three cluster records' kernels as a build compiles them (lengths 1 to 4096);
# - Llama-2-13B q4f16_1 (random weights) built twice from the reference: as it is (attention's
#   1024-row record has cluster=1) and with every cluster=1 attention record left out;
# - both builds' greedy ids for 64 tokens, then bench A B A B at prompt 8 and at prompt 1000.
# Usage (after staging, see benchmarks/device_env.sh): bash benchmarks/device_cluster_model.sh
source benchmarks/device_env.sh || exit 3
echo "device: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)  date: $(date -u +%FT%TZ)" | tee -a "$OUT/run.log"
TAIL=6 step timeout 240 python3 -m pytest -q tests/gpu/test_gemv_gpu.py -k cluster_attention
python3 - <<'EOF'
import json
with open("database/reference/sm_90.jsonl") as f, open("/tmp/no_cluster.jsonl", "w") as out:
    for line in f:
        r = json.loads(line)
        if not (r.get("template") == "decode_attention" and r.get("knobs", {}).get("cluster") == 1):
            out.write(line)
EOF
for v in cluster:database/reference/sm_90.jsonl no_cluster:/tmp/no_cluster.jsonl; do
  TAIL=4 step timeout 150 python3 -m shardtune build --model llama2-13b --random-weights --arch sm_90 \
    --prefill-buckets 16 --db "${v#*:}" -o "/tmp/m13_${v%%:*}"
  python3 -c "import json; print('${v%%:*}', [k['knobs'] for k in json.load(open('/tmp/m13_${v%%:*}/config.json'))['kernels'] if k['template'] == 'decode_attention'])" | tee -a "$OUT/run.log"
  python3 -m shardtune generate "/tmp/m13_${v%%:*}" --prompt-ids 1,2,3,4,5,6,7,8 --max-new-tokens 64 --print-ids \
    2>/dev/null > "/tmp/ids_${v%%:*}.txt"
done
python3 - <<'EOF' | tee -a "$OUT/run.log"
a, b = (open(f"/tmp/ids_{v}.txt").read().split() for v in ("cluster", "no_cluster"))
same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
print(f"greedy ids: {len(a)} and {len(b)} tokens, the same for the first {same}")
EOF
for prompt in 8 1000; do
  gen=$([ $prompt = 8 ] && echo 256 || echo 64)
  for round in 1 2; do
    for v in cluster no_cluster; do
      TAIL=3 step timeout 90 python3 -m shardtune bench "/tmp/m13_$v" --prompt-len $prompt --gen-len $gen --repeat 3 \
        --json "/tmp/bench_${v}_p${prompt}_r$round.json"
    done
  done
done
python3 benchmarks/collect_bench.py "$OUT/bench_13b_cluster_ab.json" /tmp/bench_*.json --prefix bench_ | tee -a "$OUT/run.log"
