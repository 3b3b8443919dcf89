"""Where a sharded decode step spends its time: all-reduce latency of our NCCL backend at
the sizes a step uses, the step on the GPUs alone, and the step as the controller sees it (logits read, or the
greedy token read).
Usage: python benchmarks/tp_diag.py MODEL_DIR [--json FILE]"""
import argparse
import json
import sys
import time

import shardtune


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--json")
    args = ap.parse_args()
    model = shardtune.load(args.model_dir)
    n, hidden = model.shards, model.cfg.hidden_size
    res = {"model_dir": args.model_dir, "shards": n, "device": model.device_name(), "command": " ".join(sys.argv)}
    t = model._call("shardtune.shard.time_allreduce", hidden, "float16", 500)
    res["allreduce_us"] = {f"{hidden}xfp16": t.debug_get_from_remote(0) * 1e6}
    model.generate([1, 2, 3], max_new_tokens=4, stop_at_eos=False)
    res["step_gpu_ms"] = model.step_seconds(16, 64) * 1e3
    t0 = time.perf_counter()
    for i in range(64):
        model.step(1, 100 + i)
    res["step_controller_ms"] = (time.perf_counter() - t0) / 64 * 1e3   # logits to the host each step
    t0 = time.perf_counter()
    model.greedy_steps(64, 1, 100)
    res["greedy_step_controller_ms"] = (time.perf_counter() - t0) / 64 * 1e3   # what bench runs: a token read
    model.close()
    print(json.dumps(res, indent=1))
    if args.json:
        open(args.json, "w").write(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
