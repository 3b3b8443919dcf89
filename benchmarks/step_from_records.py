"""What one decode step's kernels add up to, from a tuning database: for a model, quantization and
shard count, every call site of the step (`shardtune.plan.decode_plan`), the record a build for a GPU
takes (`TuningDB.best_for`: the fastest measured on that GPU, else another's), times the calls per
token. No GPU needed: it reads stored numbers.

The sum is an estimate, not a measurement (`shardtune bench` measures): a built step launches its
kernels with PDL, which hides part of each launch that the records' graph timing includes, while gaps
and the fused all-reduce's waits for its peers (tuned on one GPU) add time. On one H100, Llama-2-7B
q4f16_1 sums to 1.95 ms and benches at 1.87 (535 tok/s). It shows where a step's time goes, and records
that stand out: a kernel timed one launch at a time costs its launch, 5 us and more, where a step runs
it inside a CUDA graph.

    python3 benchmarks/step_from_records.py database/reference/sm_90.jsonl --model llama2-70b --shards 4 \
        [--quant q4f16_1] [--device "NVIDIA H100 80GB HBM3"] [--length 128] [--json FILE]
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys

from shardtune.database.reference import open_any
from shardtune.models import load_config
from shardtune.plan import decode_plan, kv_capacity


def step_rows(db, model: str, quant: str, shards: int, device: str, length: int, arch: str = "sm_90") -> list[dict]:
    """Per call site, the record a build for `device` takes (`TuningDB.best_for`, as the compiler picks)."""
    cfg = load_config(model)
    allreduce = "fused" if shards > 1 else "nccl"
    calls = decode_plan(cfg, quant, shards, capacity=kv_capacity(cfg), attention_length=length, allreduce=allreduce)
    rows = []
    for c in calls:
        if not c.per_token:
            continue
        best, _ = db.best_for(c.template, c.workload, arch, shards, device)
        row = {"site": c.site, "template": c.template, "workload": c.workload, "calls": c.per_token}
        if best is not None:
            row.update(us=best.latency_us, step_us=best.latency_us * c.per_token, device=best.device,
                       timing=best.extra.get("timing", "launch"), created_at=best.created_at)
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("db", help="a tuning database or a .jsonl export")
    ap.add_argument("--model", required=True)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--quant", default="q4f16_1")
    ap.add_argument("--device", default="NVIDIA H100 80GB HBM3", help="the GPU a build is for, as records name it")
    ap.add_argument("--length", type=int, default=128, help="the attention record's context length")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = step_rows(open_any(args.db), args.model, args.quant, args.shards, args.device, args.length)
    total = sum(r.get("step_us", 0.0) for r in rows)
    print(f"{'site':15s} {'template':22s} {'calls':>5s} {'us':>8s} {'us/step':>9s} {'share':>6s}  timing")
    for r in rows:
        if "us" not in r:
            print(f"{r['site']:15s} {r['template']:22s} {r['calls']:5d}  no record from {args.device}")
            continue
        other = "" if r["device"] == args.device else f", {r['device']}"
        print(f"{r['site']:15s} {r['template']:22s} {r['calls']:5d} {r['us']:8.2f} {r['step_us']:9.1f} "
              f"{100 * r['step_us'] / total:5.1f}%  {r['timing']}{other}")
    missing = sum("us" not in r for r in rows)
    print(f"sum {total / 1e3:.3f} ms a step, {1e6 / total:.1f} tok/s"
          + (f" ({missing} kernels without a record not counted)" if missing else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(["python3 benchmarks/step_from_records.py", *sys.argv[1:]]),
                       "date": datetime.datetime.now(datetime.UTC).isoformat(), "db": args.db, "model": args.model,
                       "quant": args.quant, "shards": args.shards, "device": args.device, "length": args.length,
                       "rows": rows, "sum_us": total}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
