"""Moving records between databases: JSON Lines export/import, merge and diff."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable

from ..errors import UserError
from .checks import RecordError, Validator, check_record
from .records import Record, canonical
from .store import TuningDB


# --- JSON Lines ---------------------------------------------------------------------

def export_jsonl(db: TuningDB, out: IO[str], arch=None, shards=None, template=None) -> int:
    """Write every record as one canonical JSON line, in a stable order (key, then
    created_at, then latency), so equal databases export to equal bytes. Returns the count."""
    n = 0
    for rec in db.records(arch=arch, shards=shards, template=template):
        out.write(canonical(rec.to_dict()) + "\n")
        n += 1
    return n


def _no_duplicate_keys(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise RecordError(f"duplicate field {k}")
        d[k] = v
    return d


def _no_constant(name):
    raise RecordError(f"{name} is not JSON")


def read_jsonl(path: str | os.PathLike) -> list[Record]:
    """Every record of a JSON Lines file, checked strictly, or a one-line UserError
    naming the file and line. Blank lines are allowed (and skipped)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    out, validator = [], Validator()
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys,
                             parse_constant=_no_constant)
            rec = check_record(obj)
            bad = validator.knob_error(rec)
            if bad:
                raise RecordError(bad)
        except UnicodeDecodeError:
            raise UserError(f"{path}:{lineno}: not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: bad JSON ({e.msg} at column {e.colno})") from None
        except RecordError as e:
            raise UserError(f"{path}:{lineno}: {e}") from None
        out.append(rec)
    return out


def import_jsonl(db_path: str | os.PathLike | None, jsonl_path: str | os.PathLike) -> tuple[int, int]:
    """Add the records of a JSON Lines file to a database (created if missing),
    all or nothing: the whole file is checked before the database is even opened.
    Returns (added, already present). Stale records are kept; queries skip them."""
    records = read_jsonl(jsonl_path)
    with TuningDB(db_path) as db:
        added = db.add_many(records)
    return added, len(records) - added


# --- comparing measurements ------------------------------------------------------------

def beyond_noise(a: Record, b: Record) -> bool:
    """Do two latencies differ by more than measurement noise, i.e. by more than the
    sum of their spreads and by more than 5% of the smaller?"""
    return abs(a.latency_us - b.latency_us) > max(a.latency_spread_us + b.latency_spread_us,
                                                   0.05 * min(a.latency_us, b.latency_us))


def _best_by_key(db: TuningDB, arch=None) -> dict[tuple, Record]:
    return {rec.key: rec for rec in db.best_per_key(arch=arch)}


def _as_db(x) -> tuple[TuningDB, bool]:
    return (x, False) if isinstance(x, TuningDB) else (TuningDB.open_existing(x), True)


def temp_beside(path: Path) -> str:
    """An empty temporary file in `path`'s directory (so os.replace onto `path` is atomic),
    with the permissions a plain new file would get, not mkstemp's 0600."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise UserError(f"{path}: cannot write ({e.strerror})") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return tmp


# --- merge -------------------------------------------------------------------------

@dataclass
class Conflict:
    key: tuple
    a: Record
    a_file: str
    b: Record
    b_file: str


@dataclass
class MergeReport:
    out: str
    inputs: list[str]
    keys: int = 0
    stale_skipped: int = 0
    conflicts: list[Conflict] = field(default_factory=list)


def merge(out_path: str | os.PathLike, inputs: Iterable[str | os.PathLike], arch: str | None = None) -> MergeReport:
    """A new database holding the best valid record of every key found in `inputs`
    (only for `arch` if given). Inputs are opened read-only. Where two inputs' best
    records for a key differ by more than noise, that is reported as a conflict.
    The output appears complete or not at all (temp file + os.replace)."""
    out_path = Path(out_path)
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise UserError("merge needs at least one input database")
    if out_path.exists() or any(Path(f"{out_path}{s}").exists() for s in ("-wal", "-shm")):
        # Replacing a live SQLite file under its WAL would corrupt it; merge only makes new files.
        raise UserError(f"{out_path}: already exists; merge writes a new database")
    report = MergeReport(out=str(out_path), inputs=[str(p) for p in inputs])
    found: dict[tuple, list[tuple[Record, str]]] = {}   # key -> each input's best
    for path in inputs:
        with TuningDB.open_existing(path) as db:
            valid, stale = db.validate(arch=arch)
        report.stale_skipped += len(stale)
        mine: dict[tuple, Record] = {}
        for rec in valid:
            if rec.key not in mine or rec.latency_us < mine[rec.key].latency_us:
                mine[rec.key] = rec
        for key, rec in mine.items():
            found.setdefault(key, []).append((rec, str(path)))
    best = {}
    for key in sorted(found):
        entries = found[key]
        for i, (ra, fa) in enumerate(entries):
            for rb, fb in entries[i + 1:]:
                if beyond_noise(ra, rb):
                    report.conflicts.append(Conflict(key, ra, fa, rb, fb))
        best[key] = min(entries, key=lambda e: e[0].latency_us)[0]  # ties: the earlier input
    report.keys = len(best)

    tmp = temp_beside(out_path)
    try:
        with TuningDB(tmp) as db:
            db.add_many(best.values())
        # Closing the last connection checkpointed the WAL into the file; make it durable.
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out_path)
    finally:
        for p in (tmp, f"{tmp}-wal", f"{tmp}-shm"):
            if os.path.exists(p):
                os.unlink(p)
    return report


# --- diff --------------------------------------------------------------------------

DIFF_CATEGORIES = ("faster", "slower", "unchanged", "appeared", "vanished")


@dataclass
class DiffRow:
    key: tuple
    category: str          # one of DIFF_CATEGORIES, from a's point of view to b's
    a: Record | None
    b: Record | None


def diff(a, b, arch: str | None = None) -> list[DiffRow]:
    """Compare the best valid record of every key in database `a` with database `b`."""
    rows = []
    db_a, close_a = _as_db(a)
    try:
        db_b, close_b = _as_db(b)
        try:
            best_a, best_b = _best_by_key(db_a, arch), _best_by_key(db_b, arch)
        finally:
            if close_b:
                db_b.close()
    finally:
        if close_a:
            db_a.close()
    for key in sorted(set(best_a) | set(best_b)):
        ra, rb = best_a.get(key), best_b.get(key)
        if ra is None:
            cat = "appeared"
        elif rb is None:
            cat = "vanished"
        elif not beyond_noise(ra, rb):
            cat = "unchanged"
        else:
            cat = "faster" if rb.latency_us < ra.latency_us else "slower"
        rows.append(DiffRow(key, cat, ra, rb))
    return rows
