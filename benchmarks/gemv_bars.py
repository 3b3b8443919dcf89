"""Issue 3's bandwidth bars, read from a tuning database: every q4f16_1 GEMV shape of Llama-2-7B at
1 shard and of CodeLlama-34B and Llama-2-70B at 1, 2 and 4, with its fastest current record measured
on a GPU model (any shard count with that shape), against its bar: 85% of the copy bandwidth that
record's own run measured for matrices (packed weights and scales) of 32 MB and more, 70% below;
and faster than dlight (the record's baseline, same run). No GPU needed: it reads stored numbers.

    python3 benchmarks/gemv_bars.py database/reference/sm_90.jsonl --device H100 [--json FILE]
        [--plot FILE.png [--ceiling read_speed_of_light.json]]

`--plot` draws each shape's % of copy against its matrix size, with the bars; `--ceiling` adds what a
pure read of each size reached when timed the same way (`read_speed_of_light.py`'s JSON).
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


def plot(table: list[dict], device: str, path: str, ceiling: str | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    low, high, big = min(r["matrix_mb"] for r in table), max(r["matrix_mb"] for r in table), BIG / 1e6
    ax.plot([low, big, big, high], [70, 70, 85, 85], color="gray", linestyle="--", label="issue 3's bar")
    for meets, colour, label in ((True, "tab:green", "meets its bar"), (False, "tab:red", "misses")):
        pts = [r for r in table if "pct" in r and bool(r["meets"]) == meets]
        ax.scatter([r["matrix_mb"] for r in pts], [r["pct"] for r in pts], color=colour, label=label, zorder=3)
    if ceiling:
        with open(ceiling) as f:
            read = json.load(f)
        ax.plot([r["mb"] for r in read["rows"]], [r["read_pct_of_copy"] for r in read["rows"]], color="tab:blue",
                marker=".", label=f"pure read, best setting ({read['date'][:10]})")
    ax.set_xscale("log")
    ax.set_xlabel("packed weights and scales of one GEMV (MB)")
    ax.set_ylabel("% of the copy bandwidth of its run")
    met = sum(bool(r.get("meets")) for r in table)
    ax.set_title(f"q4f16_1 GEMVs on {device}: {met} of {len(table)} shapes meet their bar")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("db", help="a tuning database or a .jsonl export")
    ap.add_argument("--device", default="H100", help="records measured on this GPU (part of its name)")
    ap.add_argument("--json")
    ap.add_argument("--plot", help="PNG of each shape's % of copy against its size, with the bars")
    ap.add_argument("--ceiling", help="read_speed_of_light.py's JSON: a pure read's % of copy, drawn on the plot")
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
    if args.plot:
        plot(table, args.device, args.plot, args.ceiling)
    return 0


if __name__ == "__main__":
    sys.exit(main())
