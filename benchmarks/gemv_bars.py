"""Issue 3's bandwidth bars, read from a tuning database: every q4f16_1 GEMV shape of Llama-2-7B at
1 shard and of CodeLlama-34B and Llama-2-70B at 1, 2 and 4, with its fastest current record measured
on a GPU model (any shard count with that shape), against its bar: 85% of the copy bandwidth that
record's own run measured for matrices (packed weights and scales) of 32 MB and more, 70% below;
and faster than dlight (the record's baseline, same run). No GPU needed: it reads stored numbers.

    python3 benchmarks/gemv_bars.py database/reference/sm_90.jsonl --device H100 [--json FILE]
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys

from shardtune.database.checks import Validator
from shardtune.database.reference import open_any
from shardtune.tuner.workloads import kernel_instances

MODELS = [("llama2-7b", 1), *((m, s) for m in ("codellama-34b", "llama2-70b") for s in (1, 2, 4))]
BIG = 32e6   # bytes of packed weights and scales from which the 85% bar applies


def rows(db, device: str) -> list[dict]:
    validator, seen, out = Validator(), set(), []
    for model, shards in MODELS:
        for inst in kernel_instances(model, shards, ["gemv"], quant="q4f16_1"):
            key = (inst.template, json.dumps(inst.workload, sort_keys=True))
            if not inst.template.startswith("q4f16_1") or key in seen:
                continue
            seen.add(key)
            N, K = inst.workload["N"], inst.workload["K"]
            recs = [r for r in db.records(arch="sm_90", template=inst.template)
                    if r.workload == inst.workload and device in r.device and validator.reason(r) is None]
            row = {"model": model, "shards": shards, "template": inst.template, "N": N, "K": K,
                   "matrix_mb": N * K * 0.5625 / 1e6}
            row["bar_pct"] = 85 if N * K * 0.5625 >= BIG else 70
            if recs:
                best = min(recs, key=lambda r: r.latency_us)
                row.update(us=best.latency_us, pct=100 * best.bandwidth_gbps / best.extra["copy_gbps"],
                           dlight_us=best.extra.get("baseline_us"), knobs=best.knobs, created_at=best.created_at)
                row["meets"] = row["pct"] >= row["bar_pct"] and (row["dlight_us"] or 0) > row["us"]
            out.append(row)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("db", help="a tuning database or a .jsonl export")
    ap.add_argument("--device", default="H100", help="records measured on this GPU (part of its name)")
    ap.add_argument("--json")
    args = ap.parse_args()
    table = rows(open_any(args.db), args.device)
    for r in table:
        got = f"{r['us']:7.2f} us {r['pct']:5.1f}%  dlight {r['dlight_us']:6.2f}" if "us" in r else "no record"
        print(f"{r['model']:14s} x{r['shards']}  {r['template']:22s} {r['N']:6d}x{r['K']:<6d} {r['matrix_mb']:6.1f} MB"
              f"  bar {r['bar_pct']}%  {got}  {'meets' if r.get('meets') else '-'}")
    met = sum(bool(r.get("meets")) for r in table)
    print(f"{met} of {len(table)} shapes meet their bar")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(["python3 benchmarks/gemv_bars.py", *sys.argv[1:]]),
                       "date": datetime.datetime.now(datetime.UTC).isoformat(), "db": args.db,
                       "device": args.device, "rows": table, "meet": met}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
