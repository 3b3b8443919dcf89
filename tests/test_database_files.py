"""The file itself: bad files are refused without being touched; many writers, and
killed writers, lose nothing that was committed."""
from __future__ import annotations

import dataclasses
import inspect
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys

import pytest

from shardtune.database import SCHEMA_VERSION, Record, TuningDB
from shardtune.errors import UserError
from shardtune.kernels import all_templates


def _open_both_ways(path):
    """Every way of opening `path`, each expected to fail; returns the messages."""
    messages = []
    for opener in (TuningDB, TuningDB.open_existing):
        with pytest.raises(UserError) as e:
            opener(path)
        messages.append(str(e.value))
    return messages


def _assert_refused_untouched(path, expected):
    before_bytes, before_files = path.read_bytes(), sorted(os.listdir(path.parent))
    for msg in _open_both_ways(path):
        assert str(path) in msg and expected in msg and "\n" not in msg
    assert path.read_bytes() == before_bytes
    return before_files


def test_random_bytes_are_refused_untouched(tmp_path):
    path = tmp_path / "noise.db"
    path.write_bytes(b"\x00garbage" + os.urandom(4096))
    files = _assert_refused_untouched(path, "not a SQLite database")
    assert sorted(os.listdir(tmp_path)) == files


def test_damaged_sqlite_is_refused_untouched(tmp_path, make_record):
    path = tmp_path / "damaged.db"
    with TuningDB(path) as db:
        db.add_many(make_record(latency_us=float(i + 1), extra={"pad": "x" * 200}) for i in range(2000))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])                       # truncated
    _assert_refused_untouched(path, "damaged")
    path.write_bytes(data[:100] + os.urandom(len(data) - 100))     # valid header, garbage pages
    _assert_refused_untouched(path, "damaged")


def test_foreign_sqlite_is_refused_untouched(tmp_path):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.execute("INSERT INTO users VALUES ('ada')")
    conn.commit()
    conn.close()
    files = _assert_refused_untouched(path, "not a shardtune database (tables: users)")
    assert sorted(os.listdir(tmp_path)) == files  # no journal, no WAL: not even opened for writing

    # A table called meta is not enough: the marker is.
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE meta (key TEXT, value TEXT)")
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    conn.commit()
    conn.close()
    _assert_refused_untouched(path, "not a shardtune database")


def test_newer_schema_is_refused_untouched(tmp_path, make_record):
    path = tmp_path / "future.db"
    with TuningDB(path) as db:
        db.add(make_record())
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    _assert_refused_untouched(
        path, f"was written by a newer shardtune (schema 99 > {SCHEMA_VERSION}); upgrade shardtune")


def test_read_commands_never_create_files(tmp_path):
    missing = tmp_path / "missing.db"
    with pytest.raises(UserError, match="no such database"):
        TuningDB.open_existing(missing)
    assert not missing.exists()
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(UserError, match="empty"):
        TuningDB.open_existing(empty)
    assert empty.read_bytes() == b""
    with TuningDB(empty) as db:  # but an empty file is fine to initialise
        assert len(db) == 0


def _record(name, i):
    return Record(template="concurrency", template_hash="h", workload={"N": i}, arch="sm_90",
                  shards=1, device="d", compute_units=1, knobs={}, latency_us=1.0 + i,
                  latency_spread_us=0.0, runs=1, bandwidth_gbps=0.0, max_rel_error=0.0,
                  host=name, extra={"seq": i})


def _write(path, name, count):
    """A writer: `count` records, one transaction each, saying which one it just committed."""
    with TuningDB(path) as db:
        for i in range(count):
            db.add(_record(name, i))
            print(i, flush=True)


# The same writer as a program of its own, to be killed mid-way.
WRITER = "\n".join(["import sys", "from shardtune.database import Record, TuningDB",
                    inspect.getsource(_record), inspect.getsource(_write),
                    "_write(sys.argv[1], sys.argv[2], int(sys.argv[3]))"])


def _seqs_by_writer(db):
    got = {}
    for rec in db.records():
        got.setdefault(rec.host, set()).add(rec.extra["seq"])
    return got


def test_concurrent_writers_lose_nothing(tmp_path):
    all_templates()  # load the templates (and TVM) once; the forked writers inherit them
    path = tmp_path / "shared.db"  # does not exist yet: the writers also race to create it
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_quietly, args=(str(path), f"w{n}", 500)) for n in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * 8
    with TuningDB.open_existing(path) as db:
        assert len(db) == 4000
        assert _seqs_by_writer(db) == {f"w{n}": set(range(500)) for n in range(8)}
        # They really wrote at the same time: in commit order the writers take turns.
        hosts = [h for (h,) in db.conn.execute("SELECT host FROM records ORDER BY rowid")]
        assert sum(a != b for a, b in zip(hosts, hosts[1:])) > 8 * 3


def _write_quietly(path, name, count):
    sys.stdout = open(os.devnull, "w")
    _write(path, name, count)


def test_killed_writer_leaves_a_consistent_prefix(tmp_path):
    path = tmp_path / "killed.db"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), "victim", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if int(line) >= 200:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    with TuningDB.open_existing(path) as db:   # opening runs SQLite's integrity check
        seqs = _seqs_by_writer(db)["victim"]
        assert len(db) == len(seqs) >= 201     # everything it reported committed is there...
        assert seqs == set(range(len(seqs)))   # ...with no gaps: each add was one transaction
        valid, stale = db.validate()
        assert len(valid) + len(stale) == len(seqs)
    with TuningDB(path) as db:                 # and a new writer carries on
        db.add(dataclasses.replace(db.records()[0], host="next"))
        assert len(db) == len(seqs) + 1
