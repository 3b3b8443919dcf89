"""The tuning database: one SQLite file, opened safely, its schema and migrations,
and the questions the tuner and the compiler ask of it.

Tables (read them with `sqlite-utils tables --counts DB`):
  meta               key/value: application=shardtune, schema_version=N
  records            one row per measured Record; one column per Record field, plus
                     `id` (content hash); workload/knobs/extra are canonical JSON text
  ms_workloads       MetaSchedule workloads (see metaschedule.py)
  ms_tuning_records  MetaSchedule tuning records
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

import sqlite_utils

from ..errors import UserError
from .checks import RecordError, Stale, Validator, check_record, record_id
from .records import Record, canonical

log = logging.getLogger("shardtune.database")

APPLICATION = "shardtune"
SCHEMA_VERSION = 3
BUSY_TIMEOUT_S = 30.0
SQLITE_HEADER = b"SQLite format 3\x00"
JSON_COLUMNS = ("workload", "knobs", "extra")
KEY_COLUMNS = ("template", "workload", "arch", "shards")
# Export order: by key, then oldest first; `id` only breaks exact ties.
EXPORT_ORDER = "template, workload, arch, shards, created_at, latency_us, id"


def default_db_path() -> Path:
    """$SHARDTUNE_DB, else ~/.cache/shardtune/tuning.db."""
    env = os.environ.get("SHARDTUNE_DB")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "shardtune" / "tuning.db"


# --- schema -------------------------------------------------------------------
# The schema is the sum of its migrations: a new file runs them all from version 0,
# so every migration is exercised on every `init`, not only on old files.
# Migrations are frozen in time: never edit one, add the next.

def _v0_to_v1(db: sqlite_utils.Database) -> None:
    db["meta"].create({"key": str, "value": str}, pk="key")
    db["meta"].insert({"key": "application", "value": APPLICATION})
    columns = {
        "id": str, "template": str, "template_hash": str, "workload": str, "arch": str,
        "shards": int, "device": str, "compute_units": int, "knobs": str,
        "latency_us": float, "latency_spread_us": float, "runs": int,
        "bandwidth_gbps": float, "max_rel_error": float, "status": str, "trials": int,
        "tvm_version": str, "tvm_ffi_version": str, "shardtune_version": str,
        "runtime_version": str, "host": str, "created_at": str, "command": str, "extra": str,
    }
    db["records"].create(columns, pk="id", not_null=set(columns))
    db["records"].create_index([*KEY_COLUMNS, "latency_us"], index_name="records_by_key")


def _v1_to_v2(db: sqlite_utils.Database) -> None:
    # MetaSchedule's own workloads and tuning records, for metaschedule.MetaScheduleDB.
    db["ms_workloads"].create({"id": int, "shash": str, "workload": str}, pk="id",
                              not_null={"shash", "workload"})
    db["ms_workloads"].create_index(["shash"], index_name="ms_workloads_by_hash")
    db["ms_tuning_records"].create(
        {"id": int, "workload_id": int, "mean_run_secs": float, "measured": int,
         "run_secs": str, "target": str, "record": str},
        pk="id", not_null={"workload_id", "mean_run_secs", "measured", "record"},
        foreign_keys=[("workload_id", "ms_workloads", "id")])
    db["ms_tuning_records"].create_index(["workload_id", "mean_run_secs"],
                                         index_name="ms_records_by_workload")


def _v2_to_v3(db: sqlite_utils.Database) -> None:
    # The hash of a record's generated code, for `shardtune regress --compile-only`. Nullable:
    # NULL is "not recorded" (every record made before this version), read back as "".
    db["records"].add_column("source_sha", str)


MIGRATIONS = {0: _v0_to_v1, 1: _v1_to_v2, 2: _v2_to_v3}  # version N -> N + 1
assert sorted(MIGRATIONS) == list(range(SCHEMA_VERSION))


def migrate(db: sqlite_utils.Database, start: int, stop: int = SCHEMA_VERSION) -> None:
    """Bring `db` from schema `start` to `stop`; the caller holds the transaction."""
    for version in range(start, stop):
        MIGRATIONS[version](db)
        db["meta"].upsert({"key": "schema_version", "value": str(version + 1)}, pk="key")


# --- opening --------------------------------------------------------------------

def _connect_readonly(path: Path) -> sqlite3.Connection:
    # mode=ro: SQLite cannot write to the file through this connection, not even to
    # roll back a hot journal or checkpoint a WAL, so inspecting a stranger's file is safe.
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    try:
        return sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, check_same_thread=False)
    except sqlite3.Error as e:
        raise UserError(f"{path}: cannot open ({e})") from None


def _inspect(path: Path, conn: sqlite3.Connection, full_check: bool) -> int:
    """The schema version of a shardtune database (0 for an empty one), or UserError."""
    try:
        if full_check:
            problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise UserError(f"{path}: damaged database ({problems[0]})")
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            return 0
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta"))
        except sqlite3.OperationalError:  # no meta table, or one of someone else's
            meta = {}
        if meta.get("application") != APPLICATION:
            raise UserError(f"{path}: not a shardtune database (tables: {', '.join(sorted(tables))})")
        try:
            version = int(meta.get("schema_version"))
        except (TypeError, ValueError):
            raise UserError(f"{path}: bad schema_version {meta.get('schema_version')!r} in table meta") from None
        if version > SCHEMA_VERSION:
            raise UserError(f"{path} was written by a newer shardtune (schema {version} > {SCHEMA_VERSION}); "
                            "upgrade shardtune")
        return version
    except sqlite3.DatabaseError as e:
        raise UserError(f"{path}: damaged or not a SQLite database ({e})") from None


def _check_header(path: Path) -> bool:
    """True if `path` holds SQLite data, False if it is empty; UserError otherwise."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if head and head != SQLITE_HEADER:
        raise UserError(f"{path}: not a SQLite database")
    return bool(head)


class TuningDB:
    """The records of one database file. Not shared between threads; open one per process
    (or per thread): SQLite's locking makes many writers safe, each add one transaction."""

    def __init__(self, path: str | os.PathLike | None = None, *, readonly: bool = False):
        self.path = Path(path if path is not None else default_db_path()).expanduser()
        self.readonly = readonly
        conn = self._open_readonly() if readonly else self._open_writable()
        self.db = sqlite_utils.Database(conn, execute_plugins=False)
        self.conn = conn

    @classmethod
    def open_existing(cls, path: str | os.PathLike | None = None) -> "TuningDB":
        """Read-only: fails on a missing or empty file, never creates or writes one."""
        return cls(path, readonly=True)

    @classmethod
    def from_records(cls, records, name: str) -> "TuningDB":
        """A read-only database in memory holding `records` (a JSON Lines file's, say): queried
        like a file, written nowhere. `name` stands for its path in messages."""
        self = cls.__new__(cls)
        self.path, self.readonly, self.schema_version = Path(name), True, SCHEMA_VERSION
        self.conn = sqlite3.connect(":memory:", check_same_thread=False)
        self.db = sqlite_utils.Database(self.conn, execute_plugins=False)
        rows = cls._rows(records)
        with self.conn:
            migrate(self.db, 0)
            self.db["records"].insert_all(rows, ignore=True)
        return self

    def _open_readonly(self) -> sqlite3.Connection:
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such database")
        if not _check_header(self.path):
            raise UserError(f"{self.path}: empty file, not a shardtune database")
        conn = _connect_readonly(self.path)
        try:
            self.schema_version = _inspect(self.path, conn, full_check=True)
            if self.schema_version == 0:
                raise UserError(f"{self.path}: empty, not a shardtune database")
            if self.schema_version < SCHEMA_VERSION:
                # An older file is read through an upgraded copy in memory: readers never write.
                mem = sqlite3.connect(":memory:", check_same_thread=False)
                conn.backup(mem)
                conn.close()
                conn = mem
                with conn:
                    migrate(sqlite_utils.Database(conn, execute_plugins=False), self.schema_version)
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_writable(self) -> sqlite3.Connection:
        if self.path.exists():
            if _check_header(self.path):
                # Look before touching: a foreign, damaged or newer file must stay byte-identical.
                ro = _connect_readonly(self.path)
                try:
                    _inspect(self.path, ro, full_check=True)
                finally:
                    ro.close()
        else:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"{self.path}: cannot create ({e.strerror})") from None
        try:
            conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S, check_same_thread=False)
        except sqlite3.Error as e:
            raise UserError(f"{self.path}: cannot open ({e})") from None
        try:
            conn.execute("BEGIN IMMEDIATE")
            # Again, under the write lock: another process may have created or upgraded it meanwhile.
            version = _inspect(self.path, conn, full_check=False)
            if version < SCHEMA_VERSION:
                migrate(sqlite_utils.Database(conn, execute_plugins=False), version)
            conn.execute("COMMIT")
            # WAL: readers never block the writer, and a killed writer leaves the last commit intact.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
        except sqlite3.Error as e:
            conn.close()
            raise UserError(f"{self.path}: cannot write ({e})") from None
        except BaseException:
            conn.close()
            raise
        self.schema_version = SCHEMA_VERSION
        return conn

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "TuningDB":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<TuningDB {self.path}{' (read-only)' if self.readonly else ''}>"

    @contextmanager
    def write(self):
        """One transaction holding the write lock from its start (BEGIN IMMEDIATE), so a
        busy database is waited for (busy timeout) instead of failing half-way."""
        if self.readonly:
            raise UserError(f"{self.path}: opened read-only")
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as e:  # locked past the busy timeout, disk full, read-only file
            raise UserError(f"{self.path}: cannot write ({e})") from None

    # --- writing ------------------------------------------------------------------
    def add(self, record: Record | dict) -> str:
        """Store one record (one transaction); returns its id. Adding it again is a no-op."""
        rows = self._rows([record])
        with self.write() as db:
            db["records"].insert(rows[0], ignore=True)
        return rows[0]["id"]

    def add_many(self, records) -> int:
        """Store records all-or-nothing (one transaction); returns how many were new."""
        rows = self._rows(records)
        with self.write() as db:
            before = db["records"].count
            db["records"].insert_all(rows, ignore=True)
            return db["records"].count - before

    @staticmethod
    def _rows(records) -> list[dict]:
        """Rows for `records`, or RecordError before anything is written."""
        validator, rows = Validator(), []
        for rec in records:
            rec = check_record(rec)
            bad = validator.knob_error(rec)
            if bad:
                raise RecordError(bad)
            rows.append(to_row(rec))
        return rows

    # --- reading ------------------------------------------------------------------
    def __len__(self) -> int:
        return self.db.execute("SELECT count(*) FROM records").fetchone()[0]

    def _select(self, where: dict, order: str) -> Iterator[Record]:
        clauses = [f"{col} = :{col}" for col, value in where.items() if value is not None]
        params = {col: value for col, value in where.items() if value is not None}
        sql = "SELECT * FROM records"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        for row in self.db.query(f"{sql} ORDER BY {order}", params):
            yield from_row(row)

    def _key(self, template, workload, arch, shards) -> dict:
        wl = workload if isinstance(workload, str) else canonical(workload)
        return {"template": template, "workload": wl, "arch": arch, "shards": shards}

    def records(self, arch=None, shards=None, template=None) -> list[Record]:
        """Every record (stale ones too), in export order."""
        return list(self._select({"template": template, "arch": arch, "shards": shards}, EXPORT_ORDER))

    def history(self, template, workload, arch, shards) -> list[Record]:
        """Every record of one key (stale ones too), oldest first."""
        return list(self._select(self._key(template, workload, arch, shards), "created_at, id"))

    def top_k(self, template, workload, arch, shards, k: int) -> list[Record]:
        """The k fastest valid records of one key, fastest first."""
        validator, out, skipped = Validator(), [], []
        for rec in self._select(self._key(template, workload, arch, shards), "latency_us, id"):
            reason = validator.reason(rec)
            if reason:
                skipped.append(reason)
                continue
            out.append(rec)
            if len(out) >= k:
                break
        _warn_skipped(skipped, f"{template} {arch} shards={shards}")
        return out

    def best(self, template, workload, arch, shards) -> Record | None:
        """The fastest valid record of one key, or None (the caller then uses defaults)."""
        found = self.top_k(template, workload, arch, shards, 1)
        return found[0] if found else None

    def best_for(self, template, workload, arch, shards, device: str | None = None) -> tuple[Record | None, int | None]:
        """(record, its shard count) that a build uses for one kernel. The per-shard workload
        decides how a kernel runs (a norm over the full hidden size runs the same at any shard
        count), so records of other shard counts serve too: `shards` first, then 1, 2, 4, 8. The
        fastest measured on `device` comes first, at any of them: one arch spans GPUs of other
        memory speeds (H100 and H200 are both sm_90), whose best knobs differ and whose times do
        not compare. Else the fastest of the first shard count that has any."""
        first = (None, None)
        for s in dict.fromkeys((shards, 1, 2, 4, 8)):
            recs = self.top_k(template, workload, arch, s, 1000)
            ours = next((r for r in recs if r.device == device), None)
            if ours is not None:
                return ours, s
            if recs and first[0] is None:
                first = (recs[0], s)
        return first

    def best_per_key(self, arch=None, shards=None, template=None) -> list[Record]:
        """The fastest valid record of every key, in key order; stale ones are skipped."""
        validator, out, skipped, done = Validator(), [], [], None
        order = "template, workload, arch, shards, latency_us, id"
        for rec in self._select({"template": template, "arch": arch, "shards": shards}, order):
            if rec.key == done:
                continue
            reason = validator.reason(rec)
            if reason:
                skipped.append(reason)
                continue
            out.append(rec)
            done = rec.key
        _warn_skipped(skipped, str(self.path))
        return out

    def validate(self, arch=None, shards=None, template=None) -> tuple[list[Record], list[Stale]]:
        """(valid records, stale records with the reason each cannot be applied here)."""
        validator, valid, stale = Validator(), [], []
        for rec in self.records(arch, shards, template):
            reason = validator.reason(rec)
            if reason:
                stale.append(Stale(rec, reason))
            else:
                valid.append(rec)
        return valid, stale

    def stats(self) -> dict:
        """Counts per (template, arch, shards), file size and schema version."""
        valid, stale = self.validate()
        groups: dict[tuple, dict] = {}
        for rec, is_stale in [(r, False) for r in valid] + [(s.record, True) for s in stale]:
            g = groups.setdefault((rec.template, rec.arch, rec.shards),
                                  {"template": rec.template, "arch": rec.arch, "shards": rec.shards,
                                   "keys": set(), "records": 0, "stale": 0})
            g["keys"].add(rec.key)
            g["records"] += 1
            g["stale"] += is_stale
        for g in groups.values():
            g["keys"] = len(g["keys"])
        size = sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())
        count = lambda table: self.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: E731
        return {
            "path": str(self.path), "file_size": size, "schema_version": self.schema_version,
            "records": len(valid) + len(stale), "valid": len(valid), "stale": len(stale),
            "groups": [groups[k] for k in sorted(groups)],
            "ms_workloads": count("ms_workloads"), "ms_tuning_records": count("ms_tuning_records"),
        }


def _warn_skipped(reasons: list[str], what: str) -> None:
    if reasons:
        log.warning("skipped %d stale record(s) for %s, e.g. %s (see `shardtune db validate`)",
                    len(reasons), what, reasons[0])


def to_row(rec: Record) -> dict:
    row = {"id": record_id(rec), **rec.to_dict()}
    for col in JSON_COLUMNS:
        row[col] = canonical(row[col])
    return row


def from_row(row: dict) -> Record:
    d = {name: row[name] for name in Record.fields()}
    d["source_sha"] = d["source_sha"] or ""
    for col in JSON_COLUMNS:
        d[col] = json.loads(d[col])
    return Record(**d)
