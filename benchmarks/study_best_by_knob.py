"""Per tuned workload, the best measured latency for each value of one knob, read from the Optuna
studies file beside a tuning database (every trial is there, not only the records kept). Shows
what a knob is worth in one run on one machine, e.g. decode attention's `mma`.

    python3 benchmarks/study_best_by_knob.py /tmp/chain0.studies.db mma --template decode_attention --json out.json
"""
from __future__ import annotations

import argparse
import json

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
            v = str(t.params.get(knob))
            if v not in best or t.value < best[v]["latency_us"]:
                best[v] = {"latency_us": t.value, "knobs": t.params}
        rows.append({"workload": json.loads(wl_key), "arch": arch, "shards": int(shards), "best": best})
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
    values = sorted({v for r in rows for v in r["best"]})
    print("shards  workload" + "".join(f"  {a.knob}={v:>4} us" for v in values))
    for r in sorted(rows, key=lambda r: (r["shards"], json.dumps(r["workload"], sort_keys=True))):
        wl = {k: v for k, v in r["workload"].items() if k not in ("batch", "dtype", "capacity", "head_dim")}
        cells = "".join(f"  {r['best'][v]['latency_us']:>12.2f}" if v in r["best"] else f"  {'-':>12}"
                        for v in values)
        print(f"{r['shards']:>6}  {json.dumps(wl):40s}{cells}")
    if a.json:
        json.dump({"knob": a.knob, "template": a.template, "rows": rows}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
