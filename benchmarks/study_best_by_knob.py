"""Per tuned workload, the best measured latency for each value of one knob, read from the Optuna
studies file beside a tuning database (every trial is there, not only the records kept). Shows
what a knob is worth in one run on one machine, e.g. decode attention's `mma`. Several knobs,
comma-separated, give the best of each combination of their values (e.g. `protocol,blocks`).

    python3 benchmarks/study_best_by_knob.py /tmp/chain0.studies.db mma --template decode_attention --json out.json
"""
from __future__ import annotations

import argparse
import json
import os

import optuna


def best_by_knob(storage: str, knob: str, template: str) -> list[dict]:
    rows = []
    for summary in optuna.get_all_study_summaries(f"sqlite:///{storage}"):
        name, wl_key, arch, shards = summary.study_name.split("|")
        if name.split("@")[0] != template:
            continue
        study = optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{storage}")
        best: dict = {}
        for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]):
            v = "/".join(str(t.params.get(k)) for k in knob.split(","))
            if v not in best or t.value < best[v]["latency_us"]:
                best[v] = {"latency_us": t.value, "knobs": t.params}
        started = min((t.datetime_start for t in study.get_trials(deepcopy=False) if t.datetime_start), default=None)
        rows.append({"workload": json.loads(wl_key), "arch": arch, "shards": int(shards), "best": best,
                     "started": started.isoformat(timespec="seconds") if started else None})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("studies")
    ap.add_argument("knob")
    ap.add_argument("--template", required=True)
    ap.add_argument("--json")
    a = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = best_by_knob(a.studies, a.knob, a.template)
    def order(v):   # numbers as numbers: blocks 2 before 16
        return [(0, int(x), "") if x.isdigit() else (1, 0, x) for x in v.split("/")]
    values = sorted({v for r in rows for v in r["best"]}, key=order)
    print(f"best us by {a.knob}")
    print(f"shards  {'workload':40s}" + "".join(f"  {v:>12}" for v in values))
    for r in sorted(rows, key=lambda r: (r["shards"], json.dumps(r["workload"], sort_keys=True))):
        wl = {k: v for k, v in r["workload"].items() if k not in ("batch", "dtype", "capacity", "head_dim")}
        cells = "".join(f"  {r['best'][v]['latency_us']:>12.2f}" if v in r["best"] else f"  {'-':>12}"
                        for v in values)
        print(f"{r['shards']:>6}  {json.dumps(wl):40s}{cells}")
    if a.json:
        out = {"knob": a.knob, "template": a.template, "rows": rows}
        db = a.studies.replace(".studies.db", ".db")
        if db != a.studies and os.path.exists(db):   # where and how: the tuning database's records say
            from shardtune.database.store import TuningDB
            first = min((r["started"] for r in rows if r["started"]), default="")   # this run's, not a warm start's
            recs = [r for r in TuningDB(db, readonly=True).records(template=a.template) if r.created_at[:19] >= first]
            out["devices"] = sorted({r.device for r in recs})
            out["created"] = [min(r.created_at for r in recs), max(r.created_at for r in recs)] if recs else []
            out["commands"] = sorted({r.command for r in recs})
        json.dump(out, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
