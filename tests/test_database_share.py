"""Moving records between databases: JSON Lines, merge, diff."""
from __future__ import annotations

import io
import json
import os

import pytest

from shardtune.database import (TuningDB, beyond_noise, canonical, diff, export_jsonl, import_jsonl,
                                merge, read_jsonl)
from shardtune.errors import UserError


def _export(path) -> bytes:
    out = io.StringIO()
    with TuningDB.open_existing(path) as db:
        export_jsonl(db, out)
    return out.getvalue().encode()


def _fill(path, records):
    with TuningDB(path) as db:
        db.add_many(records)


@pytest.fixture
def varied(make_record):
    """Records over several keys, one stale, with awkward values."""
    return [
        make_record(latency_us=0.1 + 0.2, created_at="2026-02-01T00:00:00Z"),
        make_record(latency_us=3.0, created_at="2026-01-01T00:00:00Z", device="Gerät ü", knobs={"rows": 4, "vec": 2}),
        make_record(latency_us=3.0, created_at="2026-01-01T00:00:00Z", extra={"b": [1, 2], "a": None}),
        make_record(arch="sm_89", shards=4, latency_us=1e-3, tvm_version="0.1"),
        make_record(workload={"N": 8, "K": 64, "batch": 2}, latency_us=7, runs=3, status="partial"),
    ]


def test_export_import_round_trip_is_byte_identical(tmp_path, varied):
    _fill(tmp_path / "a.db", varied)
    first = _export(tmp_path / "a.db")
    lines = first.decode().splitlines()
    assert len(lines) == 5
    assert all(canonical(json.loads(line)) == line for line in lines)  # canonical, sorted keys
    keys = [(d["template"], canonical(d["workload"]), d["arch"], d["shards"], d["created_at"], d["latency_us"])
            for d in map(json.loads, lines)]
    assert keys == sorted(keys)

    (tmp_path / "a.jsonl").write_bytes(first)
    assert import_jsonl(tmp_path / "b.db", tmp_path / "a.jsonl") == (5, 0)
    assert _export(tmp_path / "b.db") == first
    # Importing again adds nothing.
    assert import_jsonl(tmp_path / "b.db", tmp_path / "a.jsonl") == (0, 5)
    assert _export(tmp_path / "b.db") == first


def _with(**changes):
    return lambda good: json.dumps({**good, **changes})


BAD_LINES = {  # name: (good record dict -> bad line, expected message)
    "bad json": (lambda good: "{not json", "bad JSON"),
    "not an object": (lambda good: "[1, 2]", "must be a JSON object"),
    "missing field": (lambda good: json.dumps({k: v for k, v in good.items() if k != "latency_us"}),
                      "missing field(s) latency_us"),
    "wrong type": (_with(shards="2"), "field shards must be an integer, got str"),
    "nan": (_with(latency_us=float("nan")), "NaN is not JSON"),
    "unknown field": (_with(colour="red"), "unknown field(s) colour"),
    "knob out of space": (_with(knobs={"rows": 16, "vec": 1}), "knob rows=16 is not one of [1, 2, 4]"),
    "knob missing": (_with(knobs={"rows": 1}), "dbtest_gemv: knobs"),
}


@pytest.mark.parametrize("case", BAD_LINES)
def test_malformed_jsonl_is_refused_whole(tmp_path, make_record, case):
    make_bad, message = BAD_LINES[case]
    bad_line = make_bad(make_record().to_dict())
    lines = [json.dumps(make_record(latency_us=1.0).to_dict()), "",
             bad_line, json.dumps(make_record(latency_us=2.0).to_dict())]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")

    existing = tmp_path / "existing.db"
    _fill(existing, [make_record(latency_us=5.0)])
    before = _export(existing)
    with pytest.raises(UserError) as e:
        import_jsonl(existing, src)
    msg = str(e.value)
    assert msg.startswith(f"{src}:3: ") and message in msg and "\n" not in msg
    assert _export(existing) == before

    fresh = tmp_path / "fresh.db"
    with pytest.raises(UserError):
        import_jsonl(fresh, src)
    assert not fresh.exists()  # nothing created either


def test_stale_records_import_but_wrong_ones_do_not(tmp_path, make_record):
    src = tmp_path / "old.jsonl"
    # Knobs outside today's space are fine for an older template version: only stale.
    old_version = make_record(template_hash="feedfacefeedface", knobs={"rows": 64})
    unknown = make_record(template="retired_template", knobs={"anything": 1})
    src.write_text(f"{canonical(old_version.to_dict())}\n{canonical(unknown.to_dict())}\n")
    assert read_jsonl(src) == [old_version, unknown]
    assert import_jsonl(tmp_path / "t.db", src) == (2, 0)
    with TuningDB.open_existing(tmp_path / "t.db") as db:
        valid, stale = db.validate()
    assert valid == [] and len(stale) == 2


def test_merge_keeps_best_reports_conflicts_and_filters_arch(tmp_path, make_record):
    wl2 = {"N": 512, "K": 512, "batch": 1}
    a, b, c = tmp_path / "a.db", tmp_path / "b.db", tmp_path / "c.db"
    _fill(a, [make_record(latency_us=10.0), make_record(latency_us=11.0, knobs={"rows": 1, "vec": 1}),
              make_record(workload=wl2, latency_us=20.0),
              make_record(arch="sm_89", latency_us=30.0)])
    _fill(b, [make_record(latency_us=15.0, latency_spread_us=0.5, host="b"),   # conflict with a's 10
              make_record(workload=wl2, latency_us=20.5, host="b"),            # within 5%: agreement
              make_record(shards=2, latency_us=40.0)])
    _fill(c, [make_record(latency_us=1.0, tvm_version="0.1", host="c")])        # stale: never wins
    inputs = {p: p.read_bytes() for p in (a, b, c)}

    report = merge(tmp_path / "all.db", [a, b, c])
    assert report.keys == 4 and report.stale_skipped == 1
    [conflict] = report.conflicts
    assert (conflict.a.latency_us, conflict.a_file, conflict.b.latency_us, conflict.b_file) == (10.0, str(a), 15.0, str(b))
    with TuningDB.open_existing(tmp_path / "all.db") as db:
        assert sorted((r.arch, r.shards, r.latency_us) for r in db.records()) == [
            ("sm_89", 1, 30.0), ("sm_90", 1, 10.0), ("sm_90", 1, 20.0), ("sm_90", 2, 40.0)]
    assert {p: p.read_bytes() for p in inputs} == inputs  # inputs only read

    report = merge(tmp_path / "sm90.db", [a, b, c], arch="sm_90")
    assert report.keys == 3 and len(report.conflicts) == 1
    with TuningDB.open_existing(tmp_path / "sm90.db") as db:
        assert {r.arch for r in db.records()} == {"sm_90"}

    with pytest.raises(UserError, match="already exists"):
        merge(tmp_path / "all.db", [a])


def test_failed_merge_leaves_nothing(tmp_path, make_record):
    _fill(tmp_path / "a.db", [make_record()])
    (tmp_path / "broken.db").write_bytes(b"not sqlite at all" * 100)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(UserError, match="broken.db"):
        merge(tmp_path / "out.db", [tmp_path / "a.db", tmp_path / "broken.db"])
    after = sorted(os.listdir(tmp_path))
    assert "out.db" not in after and not [f for f in after if f.endswith(".tmp")]
    assert set(after) - set(before) <= {"a.db-wal", "a.db-shm"}  # a read-only open may add these


def test_noise_rule(make_record):
    r = lambda us, spread=0.0: make_record(latency_us=us, latency_spread_us=spread)  # noqa: E731
    assert not beyond_noise(r(100), r(104.9))          # under 5%
    assert beyond_noise(r(100), r(105.1))
    assert not beyond_noise(r(100, 4), r(108, 4))      # within the spreads
    assert beyond_noise(r(100, 4), r(108.1, 4))


def test_diff_categories(tmp_path, make_record):
    wl = lambda n: {"N": n, "K": 64, "batch": 1}  # noqa: E731
    _fill(tmp_path / "a.db", [make_record(workload=wl(1), latency_us=10.0), make_record(workload=wl(2), latency_us=10.0),
                              make_record(workload=wl(3), latency_us=10.0), make_record(workload=wl(4), latency_us=10.0)])
    _fill(tmp_path / "b.db", [make_record(workload=wl(1), latency_us=8.0), make_record(workload=wl(2), latency_us=12.0),
                              make_record(workload=wl(3), latency_us=10.2), make_record(workload=wl(5), latency_us=1.0)])
    rows = diff(tmp_path / "a.db", tmp_path / "b.db")
    assert [(json.loads(r.key[1])["N"], r.category) for r in rows] == [
        (1, "faster"), (2, "slower"), (3, "unchanged"), (4, "vanished"), (5, "appeared")]
    assert rows[3].b is None and rows[4].a is None and rows[0].b.latency_us == 8.0
