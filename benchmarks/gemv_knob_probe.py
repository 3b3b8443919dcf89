"""What a (new) GEMV knob is worth, on the local GPU: for each q4f16_1 GEMV shape of issue 3's bars, the
database's best knobs (a new knob at its first value, `--first`: the schedule as it was) against
variants of them (`--try`: a JSON list of knob changes, each applied to the record's knobs; a
variant the template refuses is left out), built and measured in the same run, in alternating
rounds. Writes JSON with the device, date and command. Used for `prefetch` (65512ff) and, in its
first form, `rows_per_thread` (0df4ee7): results/2026-11-27-gemv-prefetch/, -rows-per-thread/.

`--space` tries every knob set the template accepts (at the record's `decode`) instead of `--try`:
is a shape's miss the search's or the template's? `--shape TEMPLATE:NxK` picks shapes, and `--keep K`
measures only the record and the K fastest of round 1 in later rounds.

    python3 benchmarks/gemv_knob_probe.py database/reference/sm_90.jsonl --first prefetch=0 \
        --try '[{"prefetch": 1, "unroll": 1}, {"prefetch": 1, "unroll": 1, "vec": 4}]' --json out.json
    python3 benchmarks/gemv_knob_probe.py database/reference/sm_90.jsonl --space --keep 12 \
        --shape q4f16_1_gemv_silu_mul:22016x4096 --json out.json
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import shlex
import statistics
import sys

from gemv_bars import rows as bar_rows

from shardtune.database.reference import open_any
from shardtune.kernels import get_template
from shardtune.tuner.measure import Bench
from shardtune.tuner.targets import get_arch, target_of


def variants(tpl, wl: dict, best: dict, first: dict, changes: list[dict], target) -> list[dict]:
    """The record's knobs (completed by `first`), then each change applied to them, where valid."""
    out = [{**first, **best}]
    for change in changes:
        knobs = {**out[0], **change}
        if knobs not in out and tpl.check(wl, knobs, target) is None:
            out.append(knobs)
    return out


def whole_space(tpl, wl: dict, best: dict, target) -> list[dict]:
    """Every knob set of the template's GPU space at the record's decode (`variants` drops those
    the template refuses)."""
    every = (dict(zip(tpl.gpu_knobs, values)) for values in itertools.product(*tpl.gpu_knobs.values()))
    return [k for k in every if k.get("decode") == best.get("decode")]


def best_measured(variants: list[dict]) -> dict:
    """The fastest of the variants measured in every round (with --keep, not a lucky single run)."""
    most = max(v["rounds"] for v in variants)
    return min((v for v in variants if v["rounds"] == most), key=lambda v: v["us"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("db")
    ap.add_argument("--device", default="H100", help="records measured on this GPU (part of its name)")
    ap.add_argument("--first", action="append", default=[], metavar="KNOB=VALUE",
                    help="a knob the records lack, at its first value (JSON value)")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--try", dest="changes", metavar="JSON", help="a list of knob changes")
    what.add_argument("--space", action="store_true", help="every knob set the template accepts")
    ap.add_argument("--shape", action="append", default=[], metavar="TEMPLATE:NxK",
                    help="only these shapes (default: every shape of issue 3's bars)")
    ap.add_argument("--keep", type=int, help="after round 1, measure only the record and the K fastest")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--builders", type=int)
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    first = {k: json.loads(v) for k, v in (f.split("=", 1) for f in a.first)}
    changes = None if a.space else json.loads(a.changes)
    arch = get_arch("sm_90")
    target = target_of(arch)
    jobs = []
    for row in bar_rows(open_any(a.db), a.device):
        if "knobs" not in row:
            continue
        if a.shape and f"{row['template']}:{row['N']}x{row['K']}" not in a.shape:
            continue
        tpl = get_template(row["template"])
        wl = {"batch": 1, "N": row["N"], "K": row["K"], "quant": "q4f16_1"}
        tried = whole_space(tpl, wl, row["knobs"], target) if a.space else changes
        for knobs in variants(tpl, wl, row["knobs"], first, tried, target):
            jobs.append((row, tpl, wl, knobs))
    bench = Bench(arch.target, "cuda", builders=a.builders)
    try:
        copy = bench.copy_bandwidth()
        bench.ceiling_gbps = copy
        times = [[] for _ in jobs]
        chosen = list(range(len(jobs)))
        for r in range(a.rounds):
            if r == 1 and a.keep:   # each shape's record (its first job) and the K fastest
                firsts = {id(jobs[i][0]): i for i in reversed(range(len(jobs)))}
                fastest = sorted((i for i in chosen if times[i]), key=lambda i: times[i][0])
                per_shape: dict = {}
                for i in fastest:
                    per_shape.setdefault(id(jobs[i][0]), []).append(i)
                chosen = sorted({*firsts.values(), *(i for ids in per_shape.values() for i in ids[:a.keep])})
            order = chosen[::(-1 if r % 2 else 1)]
            # Artifacts are removed once measured: build each round anew.
            built = bench.build_each([(t.name, wl, k) for _, t, wl, k in (jobs[i] for i in order)])
            ms = bench.measure_many([(p, jobs[i][1].name, jobs[i][2]) for i, (p, _) in zip(order, built) if p])
            it = iter(ms)
            for i, (p, err) in zip(order, built):
                m = next(it) if p else None
                if m is not None and m.ok:
                    times[i].append(m.latency_us)
                elif r == 0:
                    print(f"{jobs[i][1].name} {jobs[i][3]}: {err or m.error}", file=sys.stderr)
            print(f"round {r + 1} of {a.rounds}", file=sys.stderr)
        device = __import__("tvm").runtime.device("cuda", 0).device_name
    finally:
        bench.close()
    shapes: dict = {}
    record_knobs = {}   # each shape's first job: its record's own knobs
    for (row, tpl, wl, knobs), ts in zip(jobs, times):
        key = f"{tpl.name} {row['N']}x{row['K']}"
        record_knobs.setdefault(key, knobs)
        entry = shapes.setdefault(key, {"template": tpl.name, "N": row["N"], "K": row["K"],
                                        "matrix_mb": row["matrix_mb"], "bar_pct": row["bar_pct"], "variants": []})
        if ts:
            us = statistics.median(ts)
            entry["variants"].append({"knobs": knobs, "us": us, "runs": ts, "rounds": len(ts),
                                      "pct": 100 * tpl.bytes_moved(wl) / (us * 1e-6) / 1e9 / copy})
    print(f"{'kernel':34s} {'record':>8s} {'best us':>8s} {'gain':>6s} {'% copy':>7s}  best knobs")
    for key, e in shapes.items():
        if not e["variants"] or e["variants"][0]["knobs"] != record_knobs[key]:
            continue   # the record's own knobs failed: nothing to compare with
        base, best = e["variants"][0], best_measured(e["variants"])
        e["gain"] = base["us"] / best["us"]
        changed = {k: v for k, v in best["knobs"].items() if base["knobs"].get(k) != v}
        print(f"{key:34s} {base['us']:8.2f} {best['us']:8.2f} {e['gain']:6.3f} {best['pct']:6.1f}%  {changed or 'the record'}")
    with open(a.json, "w") as f:
        json.dump({"device": device, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                   "command": " ".join(shlex.quote(x) for x in ["python3", *sys.argv]), "copy_gbps": copy,
                   "rounds": a.rounds, "shapes": list(shapes.values())}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
