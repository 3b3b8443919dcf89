"""The fused all-reduce against NCCL on the same sharded model: two builds of one model with
the same random weights, one with --allreduce nccl and one with --allreduce fused. Their greedy
ids and logits must agree; then the fused build is benchmarked (prompt 8, decode 256).
Usage: python benchmarks/tp_fused_check.py NCCL_DIR FUSED_DIR [--bench DIR ...] --json FILE"""
import argparse
import json
import sys
import time

import numpy as np

import shardtune


def run(path, n=32):
    model = shardtune.load(path, seed=3)
    ids, logits = model.generate([1, 7, 42, 99, 3, 250, 11, 8], max_new_tokens=n, return_logits=True,
                                 stop_at_eos=False)
    model.close()
    return ids, logits


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("nccl_dir")
    ap.add_argument("fused_dir")
    ap.add_argument("--bench", nargs="*", default=[])
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    out = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    ref_ids, ref_logits = run(args.nccl_dir)
    ids, logits = run(args.fused_dir)
    scale = float(np.abs(ref_logits).max())
    same = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), len(ids))
    out["check"] = {"tokens": len(ids), "ids_equal_for": same,
                    "max_logit_diff_rel": float(np.abs(logits[:same + 1] - ref_logits[:same + 1]).max() / scale)}
    print(json.dumps(out["check"]), flush=True)
    out["bench"] = []
    for path in args.bench:
        model = shardtune.load(path)
        res = model.bench(prompt_len=8, gen_len=256, repeat=3)
        model.close()
        print(f"{path}: {res['decode_tok_s']:.1f} tok/s on {res['device']}", flush=True)
        out["bench"].append(res)
        with open(args.json, "w") as f:   # after each: a cut-off run keeps the rest
            json.dump(out, f, indent=1)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
