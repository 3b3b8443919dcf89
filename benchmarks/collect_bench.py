"""Gather `shardtune bench --json` files of one device call into one JSON (keyed by file name, less
PREFIX and `.json`) and print a line for each.

    python3 benchmarks/collect_bench.py OUT.json /tmp/bench_*.json [--prefix bench_]
"""
from __future__ import annotations

import argparse
import json
import os


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("files", nargs="+")
    ap.add_argument("--prefix", default="")
    a = ap.parse_args()
    rows = {os.path.basename(p).removeprefix(a.prefix).removesuffix(".json"): json.load(open(p)) for p in sorted(a.files)}
    with open(a.out, "w") as f:
        json.dump(rows, f, indent=1)
    for name, r in rows.items():
        print(f"{name:24s} buckets {str(r['prefill_buckets']):14s} prompt {r['prompt_len']:5d}: prefill {r['prefill_ms']:8.1f} ms, "
              f"decode {r['decode_tok_s']:6.1f} tok/s, runs {[round(x, 1) for x in r['decode_tok_s_runs']]}")


if __name__ == "__main__":
    main()
