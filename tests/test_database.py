"""TuningDB: schema, adding, querying, staleness, migrations."""
from __future__ import annotations

import dataclasses
import logging
import sqlite3

import pytest
import sqlite_utils

from shardtune.database import (MIGRATIONS, SCHEMA_VERSION, Record, RecordError, TuningDB,
                                default_db_path, record_id)
from shardtune.database.store import migrate, to_row
from shardtune.errors import UserError


def test_new_database_is_readable_by_a_person(tmp_path):
    path = tmp_path / "nested" / "dir" / "tuning.db"
    with TuningDB(path) as db:
        assert len(db) == 0
        assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    plain = sqlite_utils.Database(path)
    assert set(plain.table_names()) == {"meta", "records", "ms_workloads", "ms_tuning_records"}
    assert plain["records"].columns_dict.keys() == {"id", *Record.fields()}
    assert plain["records"].pks == ["id"]
    meta = {r["key"]: r["value"] for r in plain["meta"].rows}
    assert meta == {"application": "shardtune", "schema_version": str(SCHEMA_VERSION)}


def test_json_columns_hold_canonical_text(tmp_path, make_record):
    rec = make_record(workload={"K": 512, "N": 256, "batch": 1}, knobs={"vec": 1, "rows": 2},
                      extra={"baseline_us": 12.5, "note": "größer"})
    with TuningDB(tmp_path / "t.db") as db:
        rid = db.add(rec)
    row = sqlite_utils.Database(tmp_path / "t.db")["records"].get(rid)
    assert row["workload"] == '{"K":512,"N":256,"batch":1}'
    assert row["knobs"] == '{"rows":2,"vec":1}'
    assert row["extra"] == '{"baseline_us":12.5,"note":"gr\\u00f6\\u00dfer"}'
    assert row["latency_us"] == 10.0 and row["shards"] == 1


def test_add_best_top_k_history(tmp_path, make_record):
    wl = {"N": 256, "K": 512, "batch": 1}
    r_old = make_record(latency_us=12.0, created_at="2026-01-01T00:00:00Z", knobs={"rows": 1, "vec": 1})
    r_fast = make_record(latency_us=9.0, created_at="2026-03-01T00:00:00Z", knobs={"rows": 4, "vec": 2})
    r_mid = make_record(latency_us=10.0, created_at="2026-02-01T00:00:00Z")
    other_shards = make_record(shards=2, latency_us=1.0)
    other_arch = make_record(arch="sm_89", latency_us=2.0)
    with TuningDB(tmp_path / "t.db") as db:
        for r in (r_old, r_fast, r_mid, other_shards, other_arch):
            db.add(r)
        assert db.add(r_fast) == record_id(r_fast)  # same content: same row, not a second one
        assert len(db) == 5
        assert db.best("dbtest_gemv", wl, "sm_90", 1) == r_fast
        assert db.top_k("dbtest_gemv", wl, "sm_90", 1, 2) == [r_fast, r_mid]
        assert db.history("dbtest_gemv", wl, "sm_90", 1) == [r_old, r_mid, r_fast]
        assert db.best("dbtest_gemv", wl, "sm_90", 4) is None
        assert db.best("dbtest_gemv", {"N": 1, "K": 1, "batch": 1}, "sm_90", 1) is None
        assert db.records(arch="sm_89") == [other_arch]
        assert db.records(shards=2) == [other_shards]
        assert len(db.records(template="dbtest_gemv")) == 5
        assert db.best_per_key(arch="sm_90") == [r_fast, other_shards]
        assert db.best_per_key() == [other_arch, r_fast, other_shards]


def test_add_many_is_all_or_nothing(tmp_path, make_record):
    good = [make_record(latency_us=float(i + 1)) for i in range(3)]
    bad = dataclasses.replace(make_record(), shards="2")
    with TuningDB(tmp_path / "t.db") as db:
        with pytest.raises(RecordError, match="shards"):
            db.add_many([*good, bad])
        assert len(db) == 0
        assert db.add_many(good) == 3
        assert db.add_many(good) == 0


@pytest.mark.parametrize("change, message", [
    ({"shards": True}, "shards must be an integer"),
    ({"latency_us": float("nan")}, "finite"),
    ({"latency_us": "fast"}, "latency_us must be a number"),
    ({"knobs": [1, 2]}, "knobs must be an object"),
    ({"status": "done"}, "status must be one of"),
    ({"shards": 0}, "shards must be >= 1"),
    ({"knobs": {"rows": 3, "vec": 1}}, "rows=3 is not one of"),
])
def test_add_refuses_malformed_records(tmp_path, make_record, change, message):
    rec = dataclasses.replace(make_record(), **change)
    with TuningDB(tmp_path / "t.db") as db:
        with pytest.raises(RecordError, match=message):
            db.add(rec)
        with pytest.raises(RecordError, match="unknown field"):
            db.add({**make_record().to_dict(), "colour": "red"})
        assert len(db) == 0


def test_stale_records_are_skipped_with_reasons(tmp_path, make_record, caplog):
    wl = {"N": 256, "K": 512, "batch": 1}
    changed = make_record(latency_us=5.0, template_hash="0123456789abcdef")
    out_of_space = make_record(latency_us=6.0, knobs={"rows": 8, "vec": 1})
    other_tvm = make_record(latency_us=7.0, tvm_version="0.19.0")
    wrong_numerics = make_record(latency_us=7.5, max_rel_error=0.5)
    unknown = make_record(template="no_such_template", latency_us=1.0)
    good = make_record(latency_us=8.0)
    slower = make_record(latency_us=9.0, knobs={"rows": 1, "vec": 1})
    path = tmp_path / "t.db"
    with TuningDB(path) as db:
        db.add_many([changed, other_tvm, wrong_numerics, unknown, good, slower])
        # add() refuses knobs outside the space of the record's own template version,
        # so write that one the way a buggy tool or a hand edit would: straight into SQLite.
        with pytest.raises(RecordError):
            db.add(out_of_space)
    with sqlite3.connect(path) as conn:
        row = to_row(out_of_space)
        conn.execute(f"INSERT INTO records ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                     list(row.values()))
    conn.close()

    with TuningDB.open_existing(path) as db, caplog.at_level(logging.WARNING, "shardtune.database"):
        assert db.best("dbtest_gemv", wl, "sm_90", 1) == good
        assert "skipped 4 stale record(s)" in caplog.text
        assert db.top_k("dbtest_gemv", wl, "sm_90", 1, 5) == [good, slower]
        assert db.best_per_key() == [good]
        valid, stale = db.validate()
        assert valid == [good, slower]
        reasons = {s.record.latency_us: s.reason for s in stale}
        assert set(reasons) == {5.0, 6.0, 7.0, 7.5, 1.0}
        assert "template dbtest_gemv changed (record 0123456789abcdef" in reasons[5.0]
        assert "knob rows=8 is not one of [1, 2, 4]" in reasons[6.0]
        assert "tuned with TVM 0.19.0" in reasons[7.0]
        assert "max_rel_error 0.5 exceeds" in reasons[7.5]
        assert reasons[1.0] == "unknown template 'no_such_template'"
        assert len(db.history("dbtest_gemv", wl, "sm_90", 1)) == 6  # history keeps everything


def test_stats_counts_per_template_arch_shards(tmp_path, make_record):
    with TuningDB(tmp_path / "t.db") as db:
        db.add_many([make_record(latency_us=1.0), make_record(latency_us=2.0),
                     make_record(workload={"N": 1, "K": 32, "batch": 1}),
                     make_record(shards=2, tvm_version="old")])
        s = db.stats()
    assert s["schema_version"] == SCHEMA_VERSION and s["file_size"] > 0
    assert (s["records"], s["valid"], s["stale"]) == (4, 3, 1)
    assert [(g["shards"], g["keys"], g["records"], g["stale"]) for g in s["groups"]] == [(1, 2, 3, 0), (2, 1, 1, 1)]


def _v1_database(path, record: Record):
    """A file as schema 1 left it: only meta and records."""
    db = sqlite_utils.Database(path)
    with db.atomic():
        migrate(db, 0, 1)
        db["records"].insert(to_row(record))
    db.close()


def test_older_schema_is_migrated_on_open(tmp_path, make_record):
    assert sorted(MIGRATIONS) == list(range(SCHEMA_VERSION))
    rec = make_record()
    path = tmp_path / "v1.db"
    _v1_database(path, rec)
    before = path.read_bytes()

    with TuningDB.open_existing(path) as db:  # readers upgrade a copy in memory, never the file
        assert db.schema_version == 1
        assert db.records() == [rec]
        assert db.stats()["ms_tuning_records"] == 0
    assert path.read_bytes() == before

    with TuningDB(path) as db:
        assert db.schema_version == SCHEMA_VERSION
        assert db.records() == [rec]
    plain = sqlite_utils.Database(path)
    assert plain["meta"].get("schema_version")["value"] == str(SCHEMA_VERSION)
    assert {"ms_workloads", "ms_tuning_records"} <= set(plain.table_names())


def test_default_db_path(monkeypatch, tmp_path):
    monkeypatch.setenv("SHARDTUNE_DB", str(tmp_path / "x.db"))
    assert default_db_path() == tmp_path / "x.db"
    monkeypatch.delenv("SHARDTUNE_DB")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_db_path() == tmp_path / ".cache" / "shardtune" / "tuning.db"
    with TuningDB() as db:
        assert db.path == tmp_path / ".cache" / "shardtune" / "tuning.db"
    assert (tmp_path / ".cache" / "shardtune" / "tuning.db").is_file()


def test_numpy_numbers_are_stored_as_plain_numbers(tmp_path, make_record):
    np = pytest.importorskip("numpy")
    rec = make_record(runs=np.int64(7), latency_us=np.float32(2.5), shards=np.int32(2))
    with TuningDB(tmp_path / "t.db") as db:
        db.add(rec)
        [back] = db.records()
    assert (back.runs, back.latency_us, back.shards) == (7, 2.5, 2)
    assert type(back.runs) is int and type(back.latency_us) is float


def test_read_only_handle_refuses_writes(tmp_path, make_record):
    with TuningDB(tmp_path / "t.db") as db:
        db.add(make_record())
    with TuningDB.open_existing(tmp_path / "t.db") as db:
        with pytest.raises(UserError, match="opened read-only"):
            db.add(make_record(latency_us=1.0))
        assert len(db) == 1


def test_records_whose_knobs_the_template_refuses_are_wrong(tmp_path):
    """Knobs inside the space that the template's check() refuses for the record's workload or
    arch (a hand edit, another tool): refused at import with one line, skipped by builds if
    already stored, because a build from them would not compile."""
    from shardtune.kernels import get_template
    from shardtune.database.checks import installed_tvm_version

    tpl = get_template("allreduce_add_norm")
    rec = Record(template=tpl.name, template_hash=tpl.source_hash, workload={"H": 256, "batch": 1, "shards": 2},
                 arch="sm_90", shards=2, device="test GPU", compute_units=132,
                 knobs={"threads": 128, "vec": 2, "protocol": "ll", "blocks": 1}, latency_us=3.0,
                 latency_spread_us=0.1, runs=50, bandwidth_gbps=10.0, max_rel_error=1e-4, trials=8,
                 tvm_version=installed_tvm_version())
    too_wide = dataclasses.replace(rec, knobs={**rec.knobs, "blocks": 4}, latency_us=1.0)   # 128 * 2 * 4 > 256
    no_cluster = dataclasses.replace(rec, arch="sm_80", workload={**rec.workload, "H": 1024},
                                     knobs={**rec.knobs, "blocks": 2}, latency_us=1.0)
    path = tmp_path / "t.db"
    with TuningDB(path) as db:
        db.add(rec)
        with pytest.raises(RecordError, match="threads \\* vec \\* blocks must divide H"):
            db.add(too_wide)
        with pytest.raises(RecordError, match="a cluster of blocks needs sm_90"):
            db.add(no_cluster)
        assert len(db) == 1
    with sqlite3.connect(path) as conn:   # written the way a hand edit would: straight into SQLite
        row = to_row(too_wide)
        conn.execute(f"INSERT INTO records ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                     list(row.values()))
    conn.close()
    with TuningDB.open_existing(path) as db:
        assert db.best(tpl.name, rec.workload, "sm_90", 2) == rec   # the faster, refused one is skipped
        valid, stale = db.validate()
        assert valid == [rec] and "refuses knobs" in stale[0].reason
