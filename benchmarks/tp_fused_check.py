"""The fused all-reduce against NCCL on the same sharded build: a build with --allreduce fused
also holds a decode step with NCCL all-reduces (its fallback), so the two run on the very same
weights. Greedy ids and logits of both on --check's model must agree; then every model is
benchmarked both ways (prompt 8, decode 256).
Usage: python benchmarks/tp_fused_check.py MODEL_DIR ... --check MODEL_DIR --json FILE"""
import argparse
import json
import sys
import time

import numpy as np

import shardtune


def run(path, allreduce, n=32):
    model = shardtune.load(path, seed=3, allreduce=allreduce)
    ids, logits = model.generate([1, 7, 42, 99, 3, 250, 11, 8], max_new_tokens=n, return_logits=True,
                                 stop_at_eos=False)
    model.close()
    return ids, logits


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*")
    ap.add_argument("--check", required=True)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    out = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    ref_ids, ref_logits = run(args.check, "nccl")
    ids, logits = run(args.check, None)
    scale = float(np.abs(ref_logits).max())
    same = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), len(ids))
    out["check"] = {"model": args.check, "tokens": len(ids), "ids_equal_for": same,
                    "max_logit_diff_rel": float(np.abs(logits[:same + 1] - ref_logits[:same + 1]).max() / scale)}
    print(json.dumps(out["check"]), flush=True)
    out["bench"] = []
    for path in args.models:
        for allreduce in (None, "nccl"):
            model = shardtune.load(path, allreduce=allreduce)
            res = model.bench(prompt_len=8, gen_len=256, repeat=3)
            model.close()
            print(f"{path} ({res['allreduce']}): {res['decode_tok_s']:.1f} tok/s on {res['device']}", flush=True)
            out["bench"].append(res)
            with open(args.json, "w") as f:   # after each: a cut-off run keeps the rest
                json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
