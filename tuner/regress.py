"""`shardtune regress`: do a database's records still hold with the installed TVM and shardtune?

Three modes, one row per key (template, workload, arch, shards) and its record: the one a
build applies (the fastest current record), or, where every record of the key is stale, the
fastest of its newest run (reported as "template changed" / "TVM changed", never skipped).

  measure (default)  rebuild each record with the tuner's own build, check its numerics and time
                     it with the tuner's own measurement (measure_on), `repeats` times, on the
                     local device or on devices under an RPC tracker key; compare with the stored
                     latency. Verdicts: same, faster, slower, wrong (numerics), failed, stale.
  --compile-only     no device: rebuild each record for its own arch (CUDA source also through
                     nvcc where it is installed) and compare the hash of the generated code with
                     the one stored. Verdicts: same, changed, new (no stored hash), failed, stale.
  --baseline-db      no build: compare the stored latencies of two databases measured on the same
                     device class. Verdicts: same, faster, slower, appeared, vanished, other device.

"stale" is a record that cannot be rebuilt here at all (unknown template, knobs the current
template no longer has): reported, not a failure, as everywhere else stale records are normal.
The exit status is 1 on any slower, wrong or failed row, else 0 (2: unusable input)."""
from __future__ import annotations

import datetime as _dt
import json
import math
import shutil
import statistics
import sys
from dataclasses import dataclass, field

from ..errors import UserError

NAN = float("nan")
FAILING = ("slower", "wrong", "failed")


# --- the numbers (pure) ----------------------------------------------------------------

def parse_threshold(text: str | float) -> float:
    """'5%' -> 0.05; a plain number is a fraction ('0.05')."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        t = text.strip()
        try:
            value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
        except ValueError:
            raise UserError(f"--threshold {text!r}: use a percentage like 5% or a fraction like 0.05") from None
    if not (0 <= value < 10) or value != value:
        raise UserError(f"--threshold {text!r}: must be between 0% and 1000%")
    return value


def verdict(before_us: float, before_spread_us: float, now_us: float, now_spread_us: float,
            threshold: float) -> str:
    """'slower' or 'faster' only when the difference is both beyond `threshold` (a fraction of
    the stored latency) and beyond the noise (the two spreads added); 'same' otherwise: a
    difference within the spread of the measurements is no evidence of a change."""
    diff = now_us - before_us
    if abs(diff) <= threshold * before_us or abs(diff) <= before_spread_us + now_spread_us:
        return "same"
    return "slower" if diff > 0 else "faster"


def combine(medians: list[float], spreads: list[float]) -> tuple[float, float]:
    """(latency, spread) of repeated measurements (each a median with its interquartile range):
    the median of the medians, and the larger of how far the medians strayed from each other
    and the widest single spread, so one quiet repeat does not make a noisy kernel look precise."""
    return statistics.median(medians), max(max(medians) - min(medians), max(spreads))


# --- which records ---------------------------------------------------------------------------

@dataclass
class Row:
    record: object                      # the Record (for --baseline-db: DB's, or the baseline's if only there)
    state: str                          # current, template changed, TVM changed, ..., unknown template
    stored_us: float = NAN
    stored_spread_us: float = NAN
    now_us: float = NAN
    now_spread_us: float = NAN
    repeats_us: list[float] = field(default_factory=list)   # the median of each repeat
    source_sha: str = ""
    verdict: str = ""
    note: str = ""

    @property
    def change(self) -> float:
        return (self.now_us - self.stored_us) / self.stored_us if self.stored_us == self.stored_us else NAN

    def to_json(self) -> dict:
        from ..database.checks import record_id
        from .api import shape_text

        r = self.record
        num = lambda x: None if x != x else x  # noqa: E731 - NaN is not JSON
        return {"template": r.template, "workload": r.workload, "shape": shape_text(r.workload), "arch": r.arch,
                "shards": r.shards, "record_id": record_id(r), "device": r.device, "created_at": r.created_at,
                "state": self.state, "stored_us": num(self.stored_us), "stored_spread_us": num(self.stored_spread_us),
                "now_us": num(self.now_us), "now_spread_us": num(self.now_spread_us), "repeats_us": self.repeats_us,
                "change": num(self.change), "stored_source_sha": r.source_sha or None,
                "source_sha": self.source_sha or None, "verdict": self.verdict, "note": self.note}


def _state(rec, validator) -> str:
    from ..database.checks import installed_tvm_version

    found = validator.template(rec.template)
    if found is None:
        return "unknown template"
    changed = [what for what, differs in (("template", rec.template_hash != found[1]),
                                          ("TVM", rec.tvm_version != installed_tvm_version())) if differs]
    return " and ".join(changed) + " changed" if changed else "current"


def select(db, arch=None, shards=None, template=None) -> list[Row]:
    """One row per key: its fastest current record, else the fastest record of its newest stale run."""
    from ..database.checks import Validator

    validator, by_key = Validator(), {}
    for rec in db.records(arch=arch, shards=shards, template=template):
        by_key.setdefault(rec.key, []).append(rec)
    rows = []
    for recs in by_key.values():
        valid = [r for r in recs if validator.reason(r) is None]
        if valid:
            rec = min(valid, key=lambda r: r.latency_us)
        else:
            newest = max(recs, key=lambda r: r.created_at)
            rec = min((r for r in recs if (r.template_hash, r.tvm_version) == (newest.template_hash, newest.tvm_version)),
                      key=lambda r: r.latency_us)
        row = Row(rec, _state(rec, validator), rec.latency_us, rec.latency_spread_us)
        reason = validator.reason(rec)
        if row.state == "current" and reason:   # e.g. numerics above a tightened tolerance
            row.note = reason
        rows.append(row)
    return rows


def _buildable(row: Row, validator) -> bool:
    """False (and the row marked stale) for a record no current template can build."""
    found = validator.template(row.record.template)
    if found is None:
        row.verdict, row.note = "stale", f"unknown template {row.record.template!r}"
        return False
    try:
        found[0].validate_knobs(row.record.knobs)
    except ValueError as e:
        row.verdict, row.note = "stale", f"knobs outside the current space ({e}): retune"
        return False
    return True


# --- the three modes -----------------------------------------------------------------------

def compare_databases(db, baseline, threshold: float, arch=None, shards=None, template=None) -> list[Row]:
    """DB's records against the baseline's (stored numbers only): 'now' is DB, 'stored' the baseline."""
    mine = {r.record.key: r for r in select(db, arch, shards, template)}
    theirs = {r.record.key: r for r in select(baseline, arch, shards, template)}
    rows = []
    for key in sorted(set(mine) | set(theirs)):
        a, b = theirs.get(key), mine.get(key)
        if b is None:
            a.verdict = "vanished"
            rows.append(a)
            continue
        b.now_us, b.now_spread_us = b.stored_us, b.stored_spread_us
        if a is None:
            b.stored_us = b.stored_spread_us = NAN
            b.verdict = "appeared"
        else:
            b.stored_us, b.stored_spread_us = a.stored_us, a.stored_spread_us
            if a.record.device != b.record.device:
                b.verdict, b.note = "other device", f"baseline measured on {a.record.device}"
            else:
                b.verdict = verdict(a.stored_us, a.stored_spread_us, b.now_us, b.now_spread_us, threshold)
            if a.state != "current" and b.state == "current":
                b.note = b.note or f"baseline record: {a.state}"
        rows.append(b)
    return rows


def compile_rows(rows: list[Row], builders: int | None = None) -> dict:
    """Rebuild every row for its own arch and compare generated code; returns what was used."""
    from ..database.checks import Validator
    from .measure import Bench
    from .targets import get_arch, target_of

    validator, nvcc, cuda = Validator(), shutil.which("nvcc") is not None, False
    by_arch: dict[str, list[Row]] = {}
    for row in rows:
        if _buildable(row, validator):
            by_arch.setdefault(row.record.arch, []).append(row)
    for arch, todo in sorted(by_arch.items()):
        try:
            a = get_arch(arch)
            target_of(a)   # AMD: checks the device bitcode and linker, in one line
        except UserError as e:
            for row in todo:
                row.verdict, row.note = "failed", f"cannot build for {arch}: {e}"
            continue
        cuda = cuda or a.vendor == "nvidia"
        bench = Bench(a.target, None, builders=builders)
        bench.nvcc = nvcc and a.vendor == "nvidia"
        try:
            built = bench.build_each([(r.record.template, r.record.workload, r.record.knobs) for r in todo])
        finally:
            bench.close()
        for row, (path, err) in zip(todo, built):
            if path is None:
                row.verdict, row.note = "failed", err
                continue
            row.source_sha = bench.source_sha[path]
            stored = row.record.source_sha
            row.verdict = "new" if not stored else ("same" if stored == row.source_sha else "changed")
    return {"nvcc": nvcc, "cuda": cuda}


def measure_rows(rows: list[Row], a, device_type: str, threshold: float, repeats: int,
                 builders: int | None = None, remote=None, where=None) -> dict:
    """Rebuild, check and time every row `repeats` times (round after round over all rows, so a
    slow drift of the device spreads over every kernel instead of biasing one); returns the device."""
    from ..database.checks import Validator
    from .api import _device_description, _remote_copy_bandwidth
    from .measure import Bench

    validator = Validator()
    todo = [r for r in rows if _buildable(r, validator)]
    bench = Bench(a.target, device_type, builders=builders, remote=remote)
    try:
        device = _device_description(device_type, where)
        if device_type != "cpu":
            # As when tuning: faster than a device copy means the cache was warm, not a fast kernel.
            bench.ceiling_gbps = _remote_copy_bandwidth(bench, remote) if remote else bench.copy_bandwidth()
        built = bench.build_each([(r.record.template, r.record.workload, r.record.knobs) for r in todo])
        live = []
        for row, (path, err) in zip(todo, built):
            if path is None:
                row.verdict, row.note = "failed", err
            else:
                row.source_sha = bench.source_sha[path]
                live.append((row, path, []))
        for k in range(repeats):
            jobs = []
            for row, path, _ in live:
                copy = f"{path[:-3]}-r{k}.so"   # measuring removes its artifact: one copy per repeat
                shutil.copyfile(path, copy)
                jobs.append((copy, row.record.template, row.record.workload))
            results = bench.measure_many(jobs)
            still = []
            for (row, path, ms), m in zip(live, results):
                if not m.ok:
                    row.verdict = "wrong" if m.error.startswith("numerics") else "failed"
                    row.note = m.error
                    continue
                ms.append(m)
                still.append((row, path, ms))
            live = still
        for row, _, ms in live:
            row.repeats_us = [m.latency_us for m in ms]
            row.now_us, row.now_spread_us = combine(row.repeats_us, [m.spread_us for m in ms])
            stored_timing = row.record.extra.get("timing", "launch")
            now_timing = ms[0].timing or "launch"
            if stored_timing != now_timing:
                # Per-launch times include the launch; graph times do not: the numbers do not compare.
                row.verdict, row.note = "stale", f"stored time was {stored_timing}-timed, now {now_timing}-timed"
                continue
            row.verdict = verdict(row.stored_us, row.stored_spread_us, row.now_us, row.now_spread_us, threshold)
            if row.record.device != device["device"]:
                row.note = f"stored on {row.record.device}"
        if bench.lost:
            print(bench.lost_summary(), file=sys.stderr)
    finally:
        bench.close()
    return device


def _measuring_arch(arch: str | None, rpc_tracker, rpc_key, rpc_workers):
    """(Arch, device type, RemoteConfig or None, remote description or None), or a one-line
    UserError where there is nothing to measure on."""
    from .api import _connect_remote
    from .targets import get_arch, local_gpu_arch

    remote = rpc_tracker or rpc_key or rpc_workers is not None
    local = None if remote else local_gpu_arch()
    if arch is None and not remote and local is None:
        raise UserError("no GPU here to re-measure on: pass --compile-only to rebuild without measuring, "
                        "--rpc-tracker HOST:PORT --rpc-key KEY to measure on remote devices, "
                        "--baseline-db OTHER to compare two databases, or --arch cpu for CPU records")
    if arch is None and remote:
        raise UserError("--rpc-tracker needs --arch: the arch of the devices under the key")
    a = get_arch(arch or local)
    device_type = {"cpu": "cpu", "nvidia": "cuda", "amd": "rocm"}[a.vendor]
    if remote:
        cfg, where, a = _connect_remote(a, device_type, rpc_tracker, rpc_key, rpc_workers, False)
        return a, device_type, cfg, where
    if a.vendor != "cpu" and local != a.name:
        raise UserError(f"--arch {a.name} needs a local {a.name} GPU to re-measure on, and this machine has "
                        f"{local or 'none'}: pass --compile-only to rebuild without measuring, or "
                        "--rpc-tracker HOST:PORT --rpc-key KEY to measure on remote ones")
    return a, device_type, None, None


# --- the command -------------------------------------------------------------------------------

def regress(db: str | None = None, arch: str | None = None, shards: int | None = None,
            template: str | None = None, threshold: float | str = "5%", repeats: int = 3,
            compile_only: bool = False, baseline_db: str | None = None, rpc_tracker: str | None = None,
            rpc_key: str | None = None, rpc_workers: int | None = None, builders: int | None = None,
            json_path: str | None = None, out=sys.stdout) -> int:
    """Run one mode, print the table, write the JSON report; returns the exit status (0 or 1).
    `db` and `baseline_db` may be database files or JSON Lines exports."""
    from .. import __version__
    from ..database import default_db_path
    from ..database.checks import installed_tvm_version
    from ..database.reference import open_any
    from .api import _command_line

    threshold = parse_threshold(threshold)
    remote = rpc_tracker or rpc_key or rpc_workers is not None
    if compile_only and (baseline_db or remote):
        raise UserError("--compile-only measures nothing: drop --baseline-db / --rpc-tracker")
    if baseline_db and remote:
        raise UserError("--baseline-db compares stored numbers: drop --rpc-tracker")
    if repeats < 1:
        raise UserError("--repeats must be at least 1")
    db_path = str(db or default_db_path())
    mode = "compile-only" if compile_only else "baseline" if baseline_db else "measure"
    report = {"mode": mode, "db": db_path, "baseline_db": baseline_db, "threshold": threshold,
              "arch": arch, "shards": shards, "template": template, "tvm_version": installed_tvm_version(),
              "shardtune_version": __version__, "command": _command_line(),
              "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    if mode == "measure":
        # Before opening anything: no device is the commonest mistake, and one line says so.
        a, device_type, cfg, where = _measuring_arch(arch, rpc_tracker, rpc_key, rpc_workers)
        arch = report["arch"] = a.name
    with open_any(db_path) as store:
        if mode == "baseline":
            with open_any(baseline_db) as base:
                rows = compare_databases(store, base, threshold, arch, shards, template)
            header = f"{db_path} against the baseline {baseline_db} (stored latencies, no measurement)"
        else:
            rows = select(store, arch, shards, template)
    if mode == "compile-only":
        used = compile_rows(rows, builders)
        header = f"{db_path}: {len(rows)} records rebuilt for their arches, no device"
        if used["cuda"]:
            header += "; CUDA source " + ("compiled by nvcc" if used["nvcc"] else "not compiled (no nvcc on PATH)")
    elif mode == "measure":
        device = measure_rows(rows, a, device_type, threshold, repeats, builders, cfg, where)
        report.update(repeats=repeats, device=device["device"])
        header = (f"{db_path}: {len(rows)} records re-measured on {device['device']} ({a.name}), "
                  f"{repeats} repeats, threshold {threshold:.0%} beyond the spread")
    report["rows"] = [r.to_json() for r in rows]
    report["counts"] = _counts(rows)
    report["failed"] = any(r.verdict in FAILING for r in rows)
    print_report(rows, mode, header, out)
    if json_path:
        try:
            with open(json_path, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=1)
                f.write("\n")
        except OSError as e:
            raise UserError(f"{json_path}: cannot write ({e.strerror})") from None
    return 1 if report["failed"] else 0


def _us(x: float) -> str:
    return "-" if x != x else f"{x:.2f}"


def print_report(rows: list[Row], mode: str, header: str, out) -> None:
    from tabulate import tabulate

    from .api import shape_text

    print(header, file=out)
    if mode == "compile-only":
        head = ["kernel", "shape", "arch", "shards", "record", "stored code", "now code", "verdict", "note"]
        body = [(r.record.template, shape_text(r.record.workload), r.record.arch, r.record.shards, r.state,
                 r.record.source_sha or "-", r.source_sha or "-", r.verdict, r.note) for r in rows]
    else:
        head = ["kernel", "shape", "arch", "shards", "record", "stored us", "now us", "change", "verdict", "note"]
        body = [(r.record.template, shape_text(r.record.workload), r.record.arch, r.record.shards, r.state,
                 f"{_us(r.stored_us)} ±{_us(r.stored_spread_us)}" if r.stored_us == r.stored_us else "-",
                 f"{_us(r.now_us)} ±{_us(r.now_spread_us)}" if r.now_us == r.now_us else "-",
                 "-" if math.isnan(r.change) else f"{r.change:+.1%}", r.verdict, r.note) for r in rows]
    if body:
        print(tabulate(body, headers=head, tablefmt="simple", disable_numparse=True), file=out)
    print(", ".join(f"{n} {v}" for v, n in _counts(rows).items()) or "no records", file=out)


def _counts(rows: list[Row]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.verdict] = counts.get(r.verdict, 0) + 1
    return dict(sorted(counts.items()))
