"""`shardtune build`: a thin layer over shardtune.compiler.build.build()."""
from __future__ import annotations

import argparse

from ..plan import DEFAULT_CAPACITY, PREFILL_BUCKETS, QUANTS


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", metavar="HF_DIR", help="a Hugging Face Llama checkpoint folder (safetensors)")
    src.add_argument("--model", help="a preset (llama2-7b, llama2-70b, ...) or a config.json, with --random-weights")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights of the model's real shapes, made on the device when it loads")
    p.add_argument("--quant", default="q4f16_1", choices=QUANTS, help="weight quantization (default q4f16_1)")
    p.add_argument("--arch", default="cpu", help="cpu, sm_80/sm_86/sm_89/sm_90, gfx90a/gfx942/gfx1100 (default cpu)")
    p.add_argument("--shards", type=int, default=1, help="tensor-parallel shard count (default 1)")
    p.add_argument("--db", help="tuning database (default ~/.cache/shardtune/tuning.db or $SHARDTUNE_DB)")
    p.add_argument("--capacity", type=int, default=DEFAULT_CAPACITY,
                   help=f"KV-cache tokens (default {DEFAULT_CAPACITY}, at most the model's context)")
    p.add_argument("--prefill-buckets", default=",".join(map(str, PREFILL_BUCKETS)), metavar="N,N,...",
                   help="prompt lengths to compile a batched prefill step for, each at most the capacity "
                        f"(default {','.join(map(str, PREFILL_BUCKETS))}; 'none': the prompt goes token by token)")
    p.add_argument("--allreduce", choices=["auto", "nccl", "fused"], default="auto",
                   help="with --shards > 1: one fused all-reduce + add + RMSNorm kernel over peer memory "
                        "(NVIDIA; the model falls back to NCCL on GPUs without peer access), or NCCL "
                        "all-reduce then add+RMSNorm. auto (default): fused on NVIDIA, NCCL elsewhere")
    p.add_argument("--device", metavar="NAME", default="auto",
                   help="prefer tuning records measured on this GPU model, as the database names it (e.g. "
                        "'NVIDIA H100 80GB HBM3'; one arch spans GPUs whose best knobs differ). Default: the "
                        "local GPU when it is of --arch; 'any': the fastest record whatever measured it")
    p.add_argument("--pdl", choices=["auto", "on", "off"], default="auto",
                   help="programmatic dependent launch: each kernel of a step is launched while the one "
                        "before it finishes, and waits for it before touching memory (NVIDIA sm_90 and "
                        "newer; auto (default): on there)")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="model folder to write")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import UserError
    from .build import build

    if args.model and not args.random_weights:
        raise UserError("--model builds random weights: add --random-weights, or pass --weights HF_DIR")
    if args.weights and args.random_weights:
        raise UserError("--random-weights goes with --model, not --weights")
    try:
        buckets = () if args.prefill_buckets.strip().lower() == "none" else \
            tuple(int(b) for b in args.prefill_buckets.split(","))
    except ValueError:
        raise UserError(f"--prefill-buckets: comma-separated token counts or 'none', got {args.prefill_buckets!r}") from None
    conf = build(args.output, model=args.model, weights=args.weights, random_weights=args.random_weights,
                 quant=args.quant, arch=args.arch, shards=args.shards, db=args.db, capacity=args.capacity,
                 prefill=buckets, allreduce=args.allreduce, device=None if args.device == "any" else args.device,
                 pdl=args.pdl)
    pdl = ", kernels launched with PDL" if conf.get("pdl") else ""
    print(f"built {conf['model']['name']} {conf['quant']} for {conf['arch']} x{conf['shards']}{pdl} "
          f"in {conf['built_with']['seconds']} s: {args.output}")
    return 0
