"""`shardtune` and `tune` command lines. Each room adds its own subcommands;
this file only wires them together and turns UserError into one line + exit 2."""
from __future__ import annotations

import argparse
import os
import sys

from .errors import UserError


def _parser() -> argparse.ArgumentParser:
    from .compiler.cli import add_build_arguments
    from .database.cli import add_db_commands
    from .runtime.cli import add_bench_arguments, add_generate_arguments
    from .tuner.cli import add_regress_arguments, add_tune_arguments
    from . import doctor

    p = argparse.ArgumentParser(prog="shardtune", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tune = sub.add_parser("tune", help="tune a model's kernels for an arch and shard count")
    add_tune_arguments(tune)

    add_build_arguments(sub.add_parser("build", help="compile a Llama with kernels from the tuning database"))
    add_generate_arguments(sub.add_parser("generate", help="generate text (or ids) with a built model"))
    add_bench_arguments(sub.add_parser("bench", help="decode tok/s, prefill time, memory, roofline fraction"))

    doc = sub.add_parser("doctor", help="versions, buildable targets, visible GPUs, default database")
    doc.set_defaults(func=doctor.run)

    add_regress_arguments(sub.add_parser("regress", help="rebuild and re-measure a database's best records; "
                                                          "fail on regressions"))

    db = sub.add_parser("db", help="tuning database: init, import, export, merge, diff, best, validate, stats")
    add_db_commands(db)
    return p


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"{args.prog_name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{args.prog_name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as the Python docs advise.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.prog_name = "shardtune"
    return _run(args)


def tune_main(argv: list[str] | None = None) -> int:
    """`tune ...` is `shardtune tune ...`."""
    from .tuner.cli import add_tune_arguments

    p = argparse.ArgumentParser(prog="tune", description="tune a model's kernels for an arch and shard count")
    add_tune_arguments(p)
    args = p.parse_args(argv)
    args.prog_name = "tune"
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
