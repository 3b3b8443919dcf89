"""The reference database shipped with shardtune: `database/reference/*.jsonl`, records
measured on lent GPUs (reference/README.md says which, where and how). `shardtune build`
falls back to it when the user's own database has nothing current for the arch and shard
count; CI validates it and rebuilds it (`shardtune regress --compile-only`)."""
from __future__ import annotations

import os
from pathlib import Path

from .share import read_jsonl
from .store import TuningDB, default_db_path

REFERENCE_DIR = Path(__file__).resolve().with_name("reference")


def reference_files() -> list[Path]:
    return sorted(REFERENCE_DIR.glob("*.jsonl"))


def open_any(path: str | os.PathLike) -> TuningDB:
    """A database file, or a JSON Lines export read into memory: both read-only."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return TuningDB.from_records(read_jsonl(path), str(path))
    return TuningDB.open_existing(path)


def open_reference(arch: str | None = None) -> TuningDB | None:
    """The shipped records (of `arch`, if given) in memory; None when there are none."""
    records = [r for f in reference_files() for r in read_jsonl(f) if arch is None or r.arch == arch]
    return TuningDB.from_records(records, str(REFERENCE_DIR)) if records else None


def open_for_build(arch: str, shards: int, log) -> tuple[TuningDB | None, str | None]:
    """(database, its name) for a build given no --db: the user's default database, unless it
    has no current record for (arch, shards) and the reference has; then the reference, and a
    line on `log` saying so. (None, None) when neither has anything."""
    path = default_db_path()
    store = TuningDB.open_existing(path) if path.exists() else None
    if store is not None and store.validate(arch=arch, shards=shards)[0]:
        return store, str(path)
    ref = open_reference(arch)
    usable = ref.validate(arch=arch, shards=shards)[0] if ref is not None else []
    if not usable:
        if ref is not None:
            ref.close()
        return store, (str(path) if store is not None else None)
    if store is not None:
        store.close()
    print(f"no current tuning records for {arch} x{shards} in {path}: using the reference database "
          f"shipped with shardtune ({REFERENCE_DIR}, {len(usable)} current records)", file=log)
    return ref, str(REFERENCE_DIR)
