"""`shardtune db ...`: look after tuning databases from the shell.

Exit status: 0 on success (also when `validate` finds stale records: they are
normal after a template or TVM change and are skipped when kernels are chosen);
2 when the input is unusable (missing, damaged, foreign or newer database,
malformed JSON Lines), with one line `shardtune: error: ...` on stderr."""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

from .records import canonical
from .share import DIFF_CATEGORIES, diff, export_jsonl, import_jsonl, merge, temp_beside
from .store import TuningDB, default_db_path

DB_HELP = "database file (default: $SHARDTUNE_DB, else ~/.cache/shardtune/tuning.db)"


def add_db_commands(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("exit status: 0 on success (also when `validate` finds stale records); "
                     "2 when a database or file is missing or unusable")
    sub = parser.add_subparsers(dest="db_command", required=True, metavar="SUBCOMMAND")

    def command(name, func, help, description=None):
        p = sub.add_parser(name, help=help, description=description or help)
        p.set_defaults(func=func)
        return p

    p = command("init", cmd_init, "create a database, or upgrade an older one in place")
    p.add_argument("db", nargs="?", metavar="DB", help=DB_HELP)

    p = command("import", cmd_import, "add the records of a JSON Lines file (all or nothing)",
                "Add the records of a JSON Lines file. The whole file is checked first; any bad line "
                "is an error naming the line, and nothing is written. Records already present are "
                "skipped, so importing twice is harmless. The database is created if missing.")
    p.add_argument("db", nargs="?", metavar="DB", help=DB_HELP)
    p.add_argument("file", metavar="FILE.jsonl")

    p = command("export", cmd_export, "write every record as JSON Lines, in a stable order")
    p.add_argument("db", nargs="?", metavar="DB", help=DB_HELP)
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")

    p = command("merge", cmd_merge, "a new database with the best record of every key of several",
                "Write a new database OUT holding the best valid record per (template, workload, arch, "
                "shards) found in the input databases, which are only read. Reports conflicts: keys whose "
                "best latencies in two inputs differ by more than noise (the sum of their spreads, and 5%).")
    p.add_argument("out", metavar="OUT", help="the new database (must not exist)")
    p.add_argument("inputs", nargs="+", metavar="DB")
    p.add_argument("--arch", help="keep only records for this arch")

    p = command("diff", cmd_diff, "compare the best record of every key between two databases",
                "For each key, B's best against A's: faster or slower (by more than noise), unchanged, "
                "appeared (only in B) or vanished (only in A).")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--arch", help="compare only this arch")

    p = command("best", cmd_best, "the best valid record of every key for an arch and shard count")
    p.add_argument("db", nargs="?", metavar="DB", help=DB_HELP)
    p.add_argument("--arch", required=True)
    p.add_argument("--shards", type=int, required=True)
    p.add_argument("--template")
    p.add_argument("--json", action="store_true", help="JSON Lines, one record per line")

    p = command("validate", cmd_validate, "list stale records and why they are skipped",
                "List records that cannot be applied with the installed templates and TVM (unknown "
                "template, template changed, knobs outside the space, other TVM version, numerics above "
                "tolerance). Exit status 0 whenever the database is readable, stale records or not; "
                "2 if it is missing or unusable.")
    p.add_argument("db", nargs="?", metavar="DB", help=DB_HELP)

    p = command("coverage", cmd_coverage, "which kernels of each model and shard count have a record",
                "For each model and shard count, the kernels a build needs and how many of them find a "
                "record (by the build's own rule: any shard count with the same per-shard workload), and "
                "how many were measured on --device. A .jsonl export works as DB too.")
    p.add_argument("db", nargs="?", metavar="DB", help=DB_HELP)
    p.add_argument("--arch", required=True)
    p.add_argument("--device", help="also count records measured on this GPU (its name, or part of it: H100)")
    p.add_argument("--models", help="comma-separated (default: every preset but tiny)")
    p.add_argument("--shards", default="1,2,4", help="comma-separated shard counts (default 1,2,4)")
    p.add_argument("--kernels", default="gemv,norm,attention,allreduce", help="kernel kinds (default: all)")
    p.add_argument("--quant", default="q4f16_1", choices=["q4f16_1", "q0f16"])

    p = command("refresh", cmd_refresh, "keep records across template edits that left their kernel unchanged",
                "Rebuild every record that only a template edit made stale (knobs added since at their "
                "first value) and compare the generated code with the hash the record stored. Where it is "
                "the same, store a copy under the current template version (extra.refreshed_from); the "
                "old record stays. The rest stay stale and need a retune. Builds without a GPU.")
    p.add_argument("db", nargs="?", metavar="DB", help=DB_HELP)
    p.add_argument("--arch", help="only records for this arch")
    p.add_argument("--builders", type=int, help="parallel build processes (default: one per CPU)")
    p.add_argument("--no-progress", action="store_true")

    p = command("stats", cmd_stats, "counts per template/arch/shards, file size, schema version")
    p.add_argument("db", nargs="?", metavar="DB", help=DB_HELP)


def _table(rows, headers) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)


def _us(x: float) -> str:
    return f"{x:.2f}"


# --- commands --------------------------------------------------------------------

def cmd_init(args) -> int:
    with TuningDB(args.db) as db:
        print(f"{db.path}: shardtune database, schema {db.schema_version}, {len(db)} records")
    return 0


def cmd_import(args) -> int:
    added, present = import_jsonl(args.db, args.file)
    print(f"imported {added} records into {args.db or default_db_path()} ({present} already present)")
    return 0


def cmd_export(args) -> int:
    with TuningDB.open_existing(args.db) as db:
        if not args.output:
            export_jsonl(db, sys.stdout)
            return 0
        out = Path(args.output)
        # Written aside and renamed, so a failed export never leaves half a file.
        tmp = temp_beside(out)
        try:
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                n = export_jsonl(db, f)
            os.replace(tmp, out)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    print(f"exported {n} records to {out}", file=sys.stderr)
    return 0


def cmd_merge(args) -> int:
    report = merge(args.out, args.inputs, arch=args.arch)
    print(f"merged {report.keys} keys from {len(report.inputs)} databases into {report.out}"
          + (f" (skipped {report.stale_skipped} stale records)" if report.stale_skipped else ""))
    if report.conflicts:
        print(f"\n{len(report.conflicts)} conflicts (best latencies differ by more than noise):")
        rows = [(c.key[0], c.key[1], c.key[2], c.key[3],
                 f"{_us(c.a.latency_us)} ±{_us(c.a.latency_spread_us)}", c.a_file,
                 f"{_us(c.b.latency_us)} ±{_us(c.b.latency_spread_us)}", c.b_file)
                for c in report.conflicts]
        print(_table(rows, ["template", "workload", "arch", "shards", "us (a)", "file a", "us (b)", "file b"]))
    return 0


def cmd_diff(args) -> int:
    rows = diff(args.a, args.b, arch=args.arch)
    counts = {}
    table = []
    for r in rows:
        counts[r.category] = counts.get(r.category, 0) + 1
        a_us = _us(r.a.latency_us) if r.a else "-"
        b_us = _us(r.b.latency_us) if r.b else "-"
        ratio = f"{r.b.latency_us / r.a.latency_us:.3f}" if r.a and r.b else "-"
        table.append((r.category, *r.key, a_us, b_us, ratio))
    if table:
        print(_table(table, ["change", "template", "workload", "arch", "shards", "us (A)", "us (B)", "B/A"]))
    print(", ".join(f"{counts.get(c, 0)} {c}" for c in DIFF_CATEGORIES))
    return 0


def cmd_best(args) -> int:
    with TuningDB.open_existing(args.db) as db:
        best = db.best_per_key(arch=args.arch, shards=args.shards, template=args.template)
    if args.json:
        for rec in best:
            print(canonical(rec.to_dict()))
        return 0
    if not best:
        print(f"no valid records for arch {args.arch}, {args.shards} shards", file=sys.stderr)
        return 0
    rows = [(r.template, canonical(r.workload), r.arch, r.shards, f"{_us(r.latency_us)} ±{_us(r.latency_spread_us)}",
             f"{r.bandwidth_gbps:.1f}", canonical(r.knobs), r.created_at) for r in best]
    print(_table(rows, ["template", "workload", "arch", "shards", "us", "GB/s", "knobs", "created"]))
    return 0


def cmd_validate(args) -> int:
    with TuningDB.open_existing(args.db) as db:
        valid, stale = db.validate()
        path = db.path
    print(f"{path}: {len(valid) + len(stale)} records, {len(valid)} valid, {len(stale)} stale")
    if stale:
        rows = [(s.record.template, canonical(s.record.workload), s.record.arch, s.record.shards,
                 s.record.created_at, s.reason) for s in stale]
        print(_table(rows, ["template", "workload", "arch", "shards", "created", "why stale"]))
    return 0


def cmd_refresh(args) -> int:
    from ..tuner.refresh import refresh, summary
    from ..tuner.targets import get_arch

    if args.arch:
        get_arch(args.arch)   # an unknown arch: one line naming the known ones
    TuningDB.open_existing(args.db).close()   # a missing or unusable file: one line, nothing created
    with TuningDB(args.db) as db:
        outcomes = refresh(db, arch=args.arch, builders=args.builders, progress=not args.no_progress)
        path = db.path
    if not outcomes:
        print(f"{path}: no stale records left to refresh")
        return 0
    print(_table(summary(outcomes), ["template", "arch", "refreshed", "code changed", "other"]))
    others = Counter(o.note for o in outcomes if o.verdict in ("not refreshable", "build failed"))
    for note, n in others.most_common(5):
        print(f"  {n} not refreshed: {note}")
    n = sum(o.verdict == "refreshed" for o in outcomes)
    print(f"{path}: {n} of {len(outcomes)} stale records refreshed")
    return 0


def cmd_coverage(args) -> int:
    from ..errors import UserError
    from ..models import PRESETS, load_config
    from ..tuner.targets import get_arch
    from ..tuner.workloads import check_kinds, kernel_instances
    from .reference import open_any

    get_arch(args.arch)   # an unknown arch: one line naming the known ones
    kinds = [k.strip() for k in args.kernels.split(",") if k.strip()]
    check_kinds(kinds)
    models = args.models.split(",") if args.models else [m for m in PRESETS if m != "tiny"]
    for model in models:
        load_config(model)   # an unknown model or a bad config.json: one line
    try:
        shard_counts = [int(s) for s in args.shards.split(",")]
    except ValueError:
        raise UserError(f"--shards {args.shards!r}: give comma-separated integers such as 1,2,4") from None
    db = open_any(args.db or default_db_path())
    device = args.device
    if device:
        names = sorted({r.device for r in db.records(arch=args.arch) if device in r.device})
        if len(names) != 1:
            raise UserError(f"--device {device!r} matches " + (", ".join(names) if names else "no GPU")
                            + f" among the {args.arch} records: name one GPU")
        device = names[0]
    rows, complete = [], True
    for model in models:
        for shards in shard_counts:
            try:
                instances = kernel_instances(model, shards, kinds, quant=args.quant)
            except UserError as e:
                rows.append((model, shards, "-", "-", "-", str(e)))
                continue
            found = [db.best_for(i.template, i.workload, args.arch, shards, device)[0] for i in instances]
            ours = [r for r in found if r is not None and r.device == device]
            missing = sorted({i.template for i, r in zip(instances, found)
                              if r is None or (device and r.device != device)})
            complete &= not missing
            rows.append((model, shards, len(instances), sum(r is not None for r in found),
                         len(ours) if device else "-", ", ".join(missing)))
    print(_table(rows, ["model", "shards", "kernels", "with a record", f"from {device or '--device'}",
                        "lacking (templates)"]))
    where = f" from {device}" if device else ""
    print(f"every kernel has a record{where}" if complete else f"some kernels lack a record{where}")
    return 0


def cmd_stats(args) -> int:
    with TuningDB.open_existing(args.db) as db:
        s = db.stats()
    print(f"{s['path']}: {s['file_size']} bytes, schema {s['schema_version']}")
    print(f"{s['records']} records ({s['valid']} valid, {s['stale']} stale); "
          f"MetaSchedule: {s['ms_workloads']} workloads, {s['ms_tuning_records']} tuning records")
    if s["groups"]:
        rows = [(g["template"], g["arch"], g["shards"], g["keys"], g["records"], g["stale"]) for g in s["groups"]]
        print(_table(rows, ["template", "arch", "shards", "keys", "records", "stale"]))
    return 0


__all__ = ["add_db_commands"]
