"""Where a decode step's time goes: every GPU kernel of the step, as the model runs it (CUDA
graph, real weights layout), timed by CUPTI through torch.profiler, grouped by the build's
kernel sites (config.json's "kernels": which template, database record or dlight each got).
Prints per site: calls per step, µs per call in the model, the tuner's stored µs, µs per
step; then the step's wall time against the sum of its kernels (the rest is gaps between
launches). A sharded build is profiled on GPU 0 (disco's worker 0 lives in this process).
Usage: python benchmarks/decode_profile.py MODEL_DIR [--steps 64] [--json FILE]"""
import argparse
import json
import sys
import time
from collections import defaultdict

import numpy as np

import shardtune


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--json")
    args = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    model = shardtune.load(args.model)
    conf = model.conf
    sites = {k["function"]: k for k in conf.get("kernels", [])}
    model.generate([1, 2, 3, 4], max_new_tokens=8, stop_at_eos=False)   # first launches, graph capture

    def steps(n: int, pos0: int = 16) -> float:
        """us per step, steps launched back to back: the step bench runs (the argmax on the GPU
        where the build has it), without its 4-byte read per token."""
        t0 = time.perf_counter()
        if conf["shards"] > 1:      # the workers run n greedy steps, one read of worker 0's tokens
            model.greedy_steps(n, 1, pos0)
        elif model.device_greedy:
            model.greedy_step(1, pos0, read=False)
            for _ in range(n - 1):
                model.greedy_step(read=False)
            model.token.numpy()
        else:
            for i in range(n):
                logits = model.run_step(1, pos0 + i)
            logits.numpy()
        return (time.perf_counter() - t0) / n * 1e6

    wall_us = float(np.median([steps(args.steps) for _ in range(3)]))
    torch.cuda.init()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        steps(args.steps)
    per_kernel = defaultdict(lambda: [0, 0.0])   # kernel name -> [calls, total µs]
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if us > 0 and not ev.key.startswith("ProfilerStep"):
            per_kernel[ev.key][0] += ev.count
            per_kernel[ev.key][1] += us

    rows = defaultdict(lambda: {"calls": 0, "us": 0.0, "stored_us": [], "source": "", "template": ""})
    longest_first = sorted(sites, key=len, reverse=True)   # a kernel name starts with its function's
    for name, (calls, us) in per_kernel.items():
        func = next((f for f in longest_first if name.startswith(f)), None)
        site = sites.get(func, {})
        key = f'{site["template"]}:{site["site"]}' if site else name[:48]
        row = rows[key]
        row["calls"] += calls
        row["us"] += us
        row["source"] = site.get("source", "-")
        row["template"] = site.get("template", "-")
        if site.get("latency_us") is not None:
            row["stored_us"].append(site["latency_us"])
    kernel_us = sum(r["us"] for r in rows.values()) / args.steps
    table = []
    for key, r in sorted(rows.items(), key=lambda kv: -kv[1]["us"]):
        table.append({"site": key, "source": r["source"], "calls_per_step": r["calls"] / args.steps,
                      "us_per_call": r["us"] / r["calls"],
                      "stored_us": float(np.mean(r["stored_us"])) if r["stored_us"] else None,
                      "us_per_step": r["us"] / args.steps, "pct_of_kernels": 100 * r["us"] / args.steps / kernel_us})
    print(f"{model.device_name()}: {model.cfg.name} {conf['quant']} TP{conf['shards']}: step {wall_us:.0f} us wall "
          f"({1e6 / wall_us:.1f} tok/s), kernels {kernel_us:.0f} us, gaps {wall_us - kernel_us:.0f} us")
    print(f"{'site':<44} {'source':<13} {'calls':>6} {'us/call':>8} {'stored':>8} {'us/step':>8} {'%':>5}")
    for t in table:
        stored = f"{t['stored_us']:.2f}" if t["stored_us"] is not None else "-"
        print(f"{t['site'][:44]:<44} {t['source'][:13]:<13} {t['calls_per_step']:>6.1f} {t['us_per_call']:>8.2f} "
              f"{stored:>8} {t['us_per_step']:>8.1f} {t['pct_of_kernels']:>5.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "device": model.device_name(), "model": model.cfg.name, "quant": conf["quant"],
                       "shards": conf["shards"], "argmax": "device" if model.device_greedy else "host",
                       "step_wall_us": wall_us, "kernel_us_per_step": kernel_us,
                       "steps": args.steps, "sites": table}, fh, indent=1)
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
