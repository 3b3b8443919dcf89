"""q4f16_1 GEMV on the local GPU: the tuned record (or the default knobs) against
TVM's dlight schedule and cuBLAS fp16 GEMV (torch F.linear), all with a cold L2,
beside the device copy bandwidth measured in the same run. Writes JSON.

    python benchmarks/gemv.py --model llama2-70b --shards 1,2,4 --db tuning.db --json out.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys

import numpy as np


def cublas_us(N: int, K: int, batch: int, repeat: int = 30) -> float:
    """torch's fp16 linear (cuBLAS), rotating weight copies past the L2, timed the way `tune`
    times our kernels on NVIDIA: the copies back to back in one CUDA graph, per call."""
    import torch
    import torch.nn.functional as F

    copies = max(2, -(-(256 << 20) // (N * K * 2)))
    ws = [torch.randn(N, K, dtype=torch.float16, device="cuda") for _ in range(copies)]
    x = torch.randn(batch, K, dtype=torch.float16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):   # cuBLAS picks its kernels and workspace outside the capture
        for w in ws:
            F.linear(x, w)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in ws:
            F.linear(x, w)
    graph.replay()
    times = []
    for _ in range(max(10, repeat // copies)):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / copies)
    del graph, ws
    torch.cuda.empty_cache()
    return float(np.median(times))


def main() -> int:
    from shardtune.kernels import get_template
    from shardtune.tuner.measure import Bench
    from shardtune.tuner.targets import get_arch, local_gpu_arch
    from shardtune.tuner.workloads import kernel_instances

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama2-70b")
    p.add_argument("--shards", default="1")
    p.add_argument("--db", help="take each kernel's best record from this database")
    p.add_argument("--sweep", type=int, default=0, help="also measure N random valid knob settings")
    p.add_argument("--json", required=True)
    args = p.parse_args()

    arch = get_arch(local_gpu_arch() or sys.exit("no GPU"))
    import tvm

    target = tvm.target.Target(arch.target)
    store = None
    if args.db:
        from shardtune.database import TuningDB

        store = TuningDB.open_existing(args.db)
    bench = Bench(arch.target, "cuda")
    copy = bench.copy_bandwidth()
    dev = tvm.cuda(0)
    rows = []
    seen = set()
    rng = np.random.default_rng(0)
    for model in args.model.split(","):
        for shards in [int(s) for s in args.shards.split(",")]:
            for inst in kernel_instances(model, shards):
                wl = inst.workload
                tpl = get_template(inst.template)
                key = (tpl.name, wl["N"], wl["K"])
                if key in seen:
                    continue
                seen.add(key)
                rec = store.best(tpl.name, wl, arch.name, shards) if store else None
                knobs = rec.knobs if rec else tpl.default_knobs(wl, target)
                sweep = tpl.sample_knobs(wl, target, rng, 1 + args.sweep, first=[knobs])[1:]
                cands = [knobs, None, *sweep]  # None: dlight
                built = bench.build_many(tpl.name, wl, cands)
                res = [bench.measure(p_, tpl.name, wl) if p_ else None for p_, _ in built]
                mb = tpl.bytes_moved(wl)
                gbps = lambda m: mb / (m.latency_us * 1e-6) / 1e9 if m and m.ok else float("nan")  # noqa: E731
                sweep = [{"knobs": k, "us": m.latency_us if m and m.ok else None,
                          "error": (m.error if m else e)} for k, m, (_, e) in zip(cands[2:], res[2:], built[2:])]
                cub = cublas_us(wl["N"], wl["K"], wl["batch"])
                ours, dl = res[0], res[1]
                row = {"model": model, "shards": shards, "template": tpl.name, "N": wl["N"], "K": wl["K"],
                       "layers": inst.layers, "weight_mb": tpl.bytes_moved(wl) / 2**20, "knobs": knobs, "from_db": bool(rec),
                       "ours_us": ours.latency_us if ours and ours.ok else None,
                       "ours_error": ours.error if ours else built[0][1],
                       "ours_gbps": gbps(ours), "ours_pct_copy": 100 * gbps(ours) / copy,
                       "dlight_us": dl.latency_us if dl and dl.ok else None,
                       "dlight_error": dl.error if dl else built[1][1], "cublas_fp16_us": cub,
                       "sweep": sweep}
                best_sweep = min((s for s in sweep if s["us"]), key=lambda s: s["us"], default=None)
                if best_sweep:
                    row["sweep_best"] = best_sweep
                rows.append(row)
                print(f"{model} tp{shards} {tpl.name} {wl['N']}x{wl['K']}: ours {row['ours_us'] or float('nan'):.1f} us "
                      f"({row['ours_pct_copy']:.0f}% of copy) dlight {row['dlight_us'] or float('nan'):.1f} "
                      f"cublas {cub:.1f}" + (f" | sweep best {best_sweep['us']:.1f} {best_sweep['knobs']}"
                                             if best_sweep else ""), flush=True)
                if row["ours_error"]:
                    print("   ours:", row["ours_error"])
    bench.close()
    out = {"device": dev.device_name, "arch": arch.name, "date": dt.datetime.now(dt.timezone.utc).isoformat(),
           "command": " ".join(shlex.quote(a) for a in sys.argv), "copy_gbps": copy, "rows": rows}
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
