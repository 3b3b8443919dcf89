"""The tuning database: the only code that touches the SQLite file.

    db = TuningDB(path)              # open or create (default: default_db_path())
    db.add(record)
    db.best(template, workload, arch, shards)   # fastest valid Record, or None

The MetaSchedule adapter (which imports TVM) is `shardtune.database.metaschedule.MetaScheduleDB`."""
from __future__ import annotations

from .checks import RecordError, Stale, check_record, record_id
from .records import Record, canonical
from .share import (Conflict, DiffRow, MergeReport, beyond_noise, diff, export_jsonl,
                    import_jsonl, merge, read_jsonl)
from .store import MIGRATIONS, SCHEMA_VERSION, TuningDB, default_db_path

__all__ = [
    "Record", "canonical", "TuningDB", "default_db_path", "SCHEMA_VERSION", "MIGRATIONS",
    "RecordError", "Stale", "check_record", "record_id",
    "export_jsonl", "import_jsonl", "read_jsonl", "merge", "MergeReport", "Conflict",
    "diff", "DiffRow", "beyond_noise",
]
