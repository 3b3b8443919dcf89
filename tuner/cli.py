"""`tune` / `shardtune tune` arguments; a thin layer over shardtune.tune()."""
from __future__ import annotations

import argparse


def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", required=True,
                   help="what to tune for: cpu (this host), sm_80/sm_86/sm_89/sm_90, gfx90a/gfx942/gfx1100")
    p.add_argument("--shards", type=int, default=1, help="tensor-parallel shard count (default 1)")
    p.add_argument("--model", default="tiny",
                   help="tiny, llama2-7b, llama2-13b, llama2-70b, codellama-34b, llama3-8b, llama3-70b, "
                        "or a path to a Hugging Face config.json (default tiny)")
    p.add_argument("--db", help="tuning database (default ~/.cache/shardtune/tuning.db or $SHARDTUNE_DB)")
    p.add_argument("--trials-per-kernel", type=int, metavar="N",
                   help="candidates built and measured per kernel (default 128 on GPUs, 48 on CPUs)")
    p.add_argument("--time-budget", metavar="T", help="stop after T in all (e.g. 600, 90s, 10m)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kernels", default="gemv", help="comma-separated kernel kinds: gemv, norm, attention, allreduce, gemm "
                                                     "(prefill's q4f16_1 GEMMs) (default gemv)")
    p.add_argument("--quant", default="q4f16_1", choices=["q4f16_1", "q0f16"],
                   help="weight quantization of the model (default q4f16_1)")
    p.add_argument("--batch", type=int, default=1, choices=[1, 2, 3, 4], help="decode batch size (default 1)")
    p.add_argument("--builders", type=int, help="parallel build processes (default: CPU count)")
    p.add_argument("--dry-run", action="store_true",
                   help="build candidates for --arch without measuring or storing (no GPU needed)")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT",
                   help="measure on devices registered with this TVM RPC tracker (with --rpc-key)")
    p.add_argument("--rpc-key", metavar="KEY", help="the tracker key the devices are registered under")
    p.add_argument("--rpc-workers", type=int, metavar="K",
                   help="devices measuring at once, one session each (default: the tracker's free servers)")
    p.add_argument("--missing-only", action="store_true",
                   help="tune only kernels without a current record from this device (at any shard count)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import UserError
    from .api import tune

    if args.trials_per_kernel is not None and args.trials_per_kernel < 1:
        raise UserError("--trials-per-kernel must be at least 1")
    tune(arch=args.arch, shards=args.shards, model=args.model, db=args.db,
         trials_per_kernel=args.trials_per_kernel, time_budget=args.time_budget, seed=args.seed,
         kernels=[k.strip() for k in args.kernels.split(",") if k.strip()], dry_run=args.dry_run,
         builders=args.builders, batch=args.batch, quant=args.quant, progress=not args.no_progress,
         rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key, rpc_workers=args.rpc_workers, missing_only=args.missing_only)
    return 0


def add_regress_arguments(p: argparse.ArgumentParser) -> None:
    from ..database.cli import DB_HELP

    p.description = ("Rebuild the best record of every key of a tuning database with the installed TVM and "
                     "shardtune, re-check its numerics and re-measure it on the local device (or through "
                     "--rpc-tracker), and compare with the stored latency. A verdict of slower or faster needs "
                     "a change beyond --threshold and beyond the spread of the measurements.")
    p.epilog = "exit status: 0 clean; 1 on any slower, wrong (numerics) or failed record; 2 unusable input"
    p.add_argument("--db", metavar="DB", help=DB_HELP + "; a .jsonl export works too")
    p.add_argument("--arch", help="only records of this arch (measuring: default, the local GPU's)")
    p.add_argument("--shards", type=int, help="only records of this shard count")
    p.add_argument("--template", help="only records of this kernel template")
    p.add_argument("--threshold", default="5%", help="smallest change reported as slower/faster (default 5%%)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per record (default 3)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--compile-only", action="store_true",
                      help="no device: rebuild every record for its arch, report build failures and changed "
                           "generated code")
    mode.add_argument("--baseline-db", metavar="OTHER",
                      help="compare DB's stored latencies with OTHER's (same device class), no build")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT", help="measure on devices under this TVM RPC tracker")
    p.add_argument("--rpc-key", metavar="KEY", help="the tracker key the devices are registered under")
    p.add_argument("--rpc-workers", type=int, metavar="K", help="devices measuring at once")
    p.add_argument("--builders", type=int, help="parallel build processes (default: CPU count)")
    p.set_defaults(func=run_regress)


def run_regress(args) -> int:
    from .regress import regress

    return regress(db=args.db, arch=args.arch, shards=args.shards, template=args.template,
                   threshold=args.threshold, repeats=args.repeats, compile_only=args.compile_only,
                   baseline_db=args.baseline_db, rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key,
                   rpc_workers=args.rpc_workers, builders=args.builders, json_path=args.json)
