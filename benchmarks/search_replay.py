"""How many trials `tune`'s search needs, replayed on spaces measured whole (no GPU).

`gemv_knob_probe.py --space` measured every knob setting of a GEMV shape on an H100. Here the tuner's
own `search` (TPE, the XGBoost cost model, neighbours first) runs against those measurements, each
candidate answered from the table instead of built and timed. The replay covers the `decode=f16x2` part
of the space only, the part that was measured. For each shape and seed it reports how close the
search's best comes to the space's best after N trials, from three starts:
- `retune`: warm-started from the shape's own record, as `tune` does when it runs again;
- `retune+transfer`: from the record, then the best settings of three other shapes;
- `transfer`: warm-started from the best settings of four other shapes, as for a new shape;
- `cold`: no warm start.

    python3 benchmarks/search_replay.py results/2026-12-08-cluster-model-gemv-space/space_*.json \
        --seeds 10 --trials 32,64,128 --json replay.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import statistics
import sys

import optuna

from shardtune.kernels import get_template
from shardtune.tuner.measure import Measurement
from shardtune.tuner.search import search
from shardtune.tuner.targets import get_arch, target_of


def key(knobs: dict) -> tuple:
    return tuple(sorted(knobs.items()))


class F16x2Only:
    """The template as the sweep measured it: its GPU space with decode fixed to f16x2."""

    def __init__(self, tpl):
        self.tpl, self.name = tpl, tpl.name

    def space_for(self, target):
        return {**self.tpl.space_for(target), "decode": ["f16x2"]}

    def check(self, wl, knobs, target):
        return self.tpl.check(wl, knobs, target)

    def default_knobs(self, wl, target):
        return {**self.tpl.default_knobs(wl, target), "decode": "f16x2"}


class TableBench:
    """Answers each candidate from a measured table (first run of each setting)."""

    overlap_builds = False

    def __init__(self, table: dict):
        self.table, self.source_sha, self.order = table, {}, []

    def submit_builds(self, jobs):
        return [key(knobs) for _, _, knobs in jobs]

    def collect_builds(self, keys):
        return [(k, "") for k in keys]

    def measure_many(self, jobs):
        out = []
        for k, _, _ in jobs:
            us = self.table.get(k)
            self.order.append(us if us is not None else math.inf)
            out.append(Measurement(us, 0.0, 10, 0.0) if us is not None else Measurement(error="not in the table"))
        return out


def load(paths: list[str]) -> list[dict]:
    shapes = []
    for path in paths:
        d = json.load(open(path))
        for e in d["shapes"]:
            vs = e["variants"]
            shapes.append({"name": f"{e['template']} {e['N']}x{e['K']}", "template": e["template"],
                           "wl": {"batch": 1, "N": e["N"], "K": e["K"], "quant": "q4f16_1"},
                           "table": {key(v["knobs"]): v["runs"][0] for v in vs}, "record": vs[0]["knobs"]})
    return shapes


def replay(shape: dict, warm: list[dict], trials: int, seed: int, target, proposals: int = 16) -> list[float]:
    """Best-so-far latency after each trial."""
    bench = TableBench(shape["table"])
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=8))
    tpl = F16x2Only(get_template(shape["template"]))
    search(tpl, shape["wl"], target, study, bench, trials, math.inf, warm, seed, builds_per_round=8,
           proposals=proposals)
    best, out = math.inf, []
    for us in bench.order:
        best = min(best, us)
        out.append(best)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--trials", default="32,64,128", help="report after these many trials (the largest is run)")
    ap.add_argument("--starts", default="retune,retune+transfer,transfer,cold")
    ap.add_argument("--proposals", type=int, default=16, help="TPE proposals a round, of which the cost model picks 8")
    ap.add_argument("--json")
    a = ap.parse_args()
    marks = sorted(int(t) for t in a.trials.split(","))
    target = target_of(get_arch("sm_90"))
    shapes = load(a.files)
    fastest = {s["name"]: min(s["table"], key=s["table"].get) for s in shapes}
    rows = []
    for s in shapes:
        space_best = min(s["table"].values())
        others = [dict(k) for n, k in fastest.items() if n != s["name"]]
        starts = {"retune": [s["record"]], "retune+transfer": [s["record"], *others[:3]],
                  "transfer": others[:4], "cold": []}
        for start, warm in ((k, v) for k, v in starts.items() if k in a.starts.split(",")):
            gaps = {m: [] for m in marks}
            for seed in range(a.seeds):
                curve = replay(s, warm, marks[-1], seed, target, a.proposals)
                for m in marks:
                    gaps[m].append(curve[min(m, len(curve)) - 1] / space_best - 1)
            row = {"shape": s["name"], "start": start, "space_size": len(s["table"]),
                   **{f"gap_at_{m}": gaps[m] for m in marks}}
            rows.append(row)
            print(f"{s['name']:34s} {start:15s} " + "  ".join(
                f"{m}: median {100 * statistics.median(gaps[m]):4.1f}% worst {100 * max(gaps[m]):4.1f}%" for m in marks),
                flush=True)
    print("\nover all shapes (median of the shapes' medians / worst of any seed):")
    for start in a.starts.split(","):
        sel = [r for r in rows if r["start"] == start]
        print(f"  {start:15s} " + "  ".join(
            f"{m}: {100 * statistics.median(statistics.median(r[f'gap_at_{m}']) for r in sel):4.1f}% / "
            f"{100 * max(max(r[f'gap_at_{m}']) for r in sel):4.1f}%, "
            f"{sum(g > 0.02 for r in sel for g in r[f'gap_at_{m}'])} of {sum(len(r[f'gap_at_{m}']) for r in sel)} > 2%"
            for m in marks))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                       "command": " ".join(shlex.quote(x) for x in ["python3", *sys.argv]),
                       "measured_on": json.load(open(a.files[0]))["device"], "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
