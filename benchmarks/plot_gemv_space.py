"""Draw `gemv_knob_probe.py --space` results: for each shape, every knob setting's % of copy (its
first run), the record's and the best setting's (medians over every round), against issue 3's bar.
No GPU needed: it reads the probe's JSON.

    python3 benchmarks/plot_gemv_space.py results/2026-12-08-cluster-model-gemv-space/space_*.json -o space.png
"""
from __future__ import annotations

import argparse
import json

from gemv_knob_probe import best_measured


def shapes(paths: list[str]) -> list[dict]:
    """Each shape of the files: its label, bar, every setting's first-run % and the record's and
    best's median %, smallest matrix first."""
    out = []
    for path in paths:
        d = json.load(open(path))
        for e in d["shapes"]:
            vs = e["variants"]
            best = best_measured(vs)
            # A setting's first run, as a share of copy: pct scales as 1 / time.
            first = [v["pct"] * v["us"] / v["runs"][0] for v in vs]
            out.append({"label": f"{e['template'].removeprefix('q4f16_1_')}\n{e['N']}x{e['K']}\n{e['matrix_mb']:.0f} MB",
                        "mb": e["matrix_mb"], "bar": e["bar_pct"], "first": first, "record": vs[0]["pct"],
                        "best": best["pct"], "device": d["device"], "date": d["date"][:10]})
    return sorted(out, key=lambda s: (s["mb"], s["label"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("-o", "--out", required=True, help="PNG to write")
    a = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    table = shapes(a.files)
    fig, ax = plt.subplots(figsize=(11, 5))
    rng = np.random.default_rng(0)
    for x, s in enumerate(table):
        ax.scatter(x + rng.uniform(-0.3, 0.3, len(s["first"])), s["first"], s=4, color="tab:gray", alpha=0.35,
                   label="every knob setting (one run)" if x == 0 else None)
        ax.hlines(s["bar"], x - 0.4, x + 0.4, color="tab:red", label="issue 3's bar" if x == 0 else None)
        ax.scatter([x], [s["record"]], marker="o", color="tab:blue", zorder=3, label="the record's knobs" if x == 0 else None)
        ax.scatter([x], [s["best"]], marker="*", s=90, color="tab:green", zorder=3, label="best of the space" if x == 0 else None)
    ax.set_xticks(range(len(table)), [s["label"] for s in table], fontsize=7)
    ax.set_ylabel("% of the copy bandwidth measured in the same run\n(settings below 30% not shown)")
    ax.set_ylim(30, 100)
    ax.set_title(f"The GEMV template's whole knob space on the shapes that miss issue 3's bars "
                 f"({table[0]['device']}, {table[0]['date']})", fontsize=10)
    ax.legend(loc="upper left", fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    for s in table:
        print(f"{' '.join(s['label'].split()):44s} bar {s['bar']}%  record {s['record']:.1f}%  best {s['best']:.1f}%")


if __name__ == "__main__":
    main()
