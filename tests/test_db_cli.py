"""`shardtune db ...` as a user runs it: a real process, exit codes, one-line errors."""
from __future__ import annotations

import dataclasses
import io
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from shardtune.database import SCHEMA_VERSION, Record, TuningDB, canonical, export_jsonl
from shardtune.database.checks import Validator, check_record, installed_tvm_version
from shardtune.kernels import get_template

TEMPLATE = "q4f16_1_gemv"  # a real template, so records are valid in the child process too


def shardtune(*args, env=None):
    return subprocess.run([sys.executable, "-m", "shardtune", *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=env)


def _knobs_in_space(tpl) -> dict:
    """A knob setting the template accepts for the records' GEMV shapes on sm_90, as a tuner stores."""
    from shardtune.tuner.targets import get_arch, target_of

    target = target_of(get_arch("sm_90"))
    knobs = tpl.default_knobs({"N": 4096, "K": 4096, "batch": 1, "quant": "q4f16_1"}, target)
    for n in (4096, 2048):
        assert tpl.check({"N": n, "K": 4096, "batch": 1, "quant": "q4f16_1"}, knobs, target) is None
    return knobs


@pytest.fixture
def q4_record():
    tpl = get_template(TEMPLATE)
    knobs = _knobs_in_space(tpl)

    def make(**overrides):
        fields = dict(template=TEMPLATE, template_hash=tpl.source_hash,
                      workload={"N": 4096, "K": 4096, "batch": 1, "quant": "q4f16_1"}, arch="sm_90",
                      shards=1, device="NVIDIA H100 80GB HBM3", compute_units=132, knobs=knobs,
                      latency_us=20.0, latency_spread_us=0.3, runs=100, bandwidth_gbps=900.0,
                      max_rel_error=1e-4, tvm_version=installed_tvm_version(),
                      created_at="2026-11-26T12:00:00Z")
        fields.update(overrides)
        return Record(**fields)

    return make


def _one_line_error(proc, *expected):
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("shardtune: error: ")
    for text in expected:
        assert text in proc.stderr


def test_init_import_export(tmp_path, q4_record):
    db, src = tmp_path / "t.db", tmp_path / "in.jsonl"
    records = [q4_record(latency_us=20.0), q4_record(latency_us=18.0, created_at="2026-11-27T00:00:00Z"),
               q4_record(shards=2, workload={"N": 2048, "K": 4096, "batch": 1, "quant": "q4f16_1"})]
    src.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in reversed(records)))

    proc = shardtune("db", "init", db)
    assert proc.returncode == 0 and f"schema {SCHEMA_VERSION}, 0 records" in proc.stdout
    proc = shardtune("db", "import", db, src)
    assert proc.returncode == 0 and "imported 3 records" in proc.stdout
    proc = shardtune("db", "import", db, src)
    assert proc.returncode == 0 and "imported 0 records" in proc.stdout and "(3 already present)" in proc.stdout

    expected = io.StringIO()
    with TuningDB.open_existing(db) as tdb:
        export_jsonl(tdb, expected)
    proc = shardtune("db", "export", db)
    assert proc.returncode == 0 and proc.stdout == expected.getvalue()
    # by key (workload text sorts N=2048 first), then oldest first
    assert [(d["workload"]["N"], d["latency_us"]) for d in map(json.loads, proc.stdout.splitlines())] == [
        (2048, 20.0), (4096, 20.0), (4096, 18.0)]
    proc = shardtune("db", "export", db, "-o", tmp_path / "out.jsonl")
    assert proc.returncode == 0 and (tmp_path / "out.jsonl").read_text() == expected.getvalue()


def test_best_validate_stats(tmp_path, q4_record):
    db = tmp_path / "t.db"
    with TuningDB(db) as tdb:
        tdb.add_many([q4_record(latency_us=20.0), q4_record(latency_us=15.5),
                      q4_record(latency_us=3.0, tvm_version="0.1.0"),   # fastest, but stale
                      q4_record(arch="sm_89", latency_us=1.0)])
        best = tdb.best_per_key(arch="sm_90", shards=1)

    proc = shardtune("db", "best", db, "--arch", "sm_90", "--shards", 1)
    assert proc.returncode == 0
    header, rule, *rows = proc.stdout.splitlines()
    assert header.split()[:5] == ["template", "workload", "arch", "shards", "us"]
    assert len(rows) == 1 and "15.50 ±0.30" in rows[0] and rows[0].startswith(TEMPLATE)
    assert header.index("us ") == rows[0].index("15.50")  # aligned columns

    proc = shardtune("db", "best", db, "--arch", "sm_90", "--shards", 1, "--json")
    assert proc.returncode == 0
    assert [Record(**json.loads(line)) for line in proc.stdout.splitlines()] == best
    assert proc.stdout == "".join(canonical(r.to_dict()) + "\n" for r in best)

    proc = shardtune("db", "validate", db)
    assert proc.returncode == 0   # stale records are normal: reported, not an error
    assert "4 records, 3 valid, 1 stale" in proc.stdout and "tuned with TVM 0.1.0" in proc.stdout

    proc = shardtune("db", "stats", db)
    assert proc.returncode == 0 and f"schema {SCHEMA_VERSION}" in proc.stdout and "4 records (3 valid, 1 stale)" in proc.stdout
    assert any(line.split()[:6] == [TEMPLATE, "sm_90", "1", "1", "3", "1"] for line in proc.stdout.splitlines())


def test_merge_and_diff(tmp_path, q4_record):
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    wl2 = {"N": 11008, "K": 4096, "batch": 1, "quant": "q4f16_1"}
    with TuningDB(a) as tdb:
        tdb.add_many([q4_record(latency_us=20.0), q4_record(workload=wl2, latency_us=50.0),
                      q4_record(arch="sm_89", latency_us=30.0)])
    with TuningDB(b) as tdb:
        tdb.add_many([q4_record(latency_us=30.0, host="b"), q4_record(workload=wl2, latency_us=50.5, host="b"),
                      q4_record(arch="sm_89", latency_us=10.0, host="b")])

    proc = shardtune("db", "merge", tmp_path / "m.db", a, b, "--arch", "sm_90")
    assert proc.returncode == 0, proc.stderr
    assert f"merged 2 keys from 2 databases into {tmp_path / 'm.db'}" in proc.stdout
    assert "1 conflicts" in proc.stdout
    conflict = [line for line in proc.stdout.splitlines() if "20.00" in line]
    assert len(conflict) == 1 and "30.00" in conflict[0] and str(a) in conflict[0] and str(b) in conflict[0]
    with TuningDB.open_existing(tmp_path / "m.db") as tdb:
        assert sorted(r.latency_us for r in tdb.records()) == [20.0, 50.0]

    proc = shardtune("db", "diff", a, b)
    assert proc.returncode == 0
    changes = {line.split()[0] for line in proc.stdout.splitlines()[2:-1]}
    assert changes == {"slower", "unchanged", "faster"}
    assert proc.stdout.splitlines()[-1] == "1 faster, 1 slower, 1 unchanged, 0 appeared, 0 vanished"


def test_bad_input_is_one_line_and_touches_nothing(tmp_path, q4_record):
    foreign = tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE photos (id INTEGER)")
    conn.commit()
    conn.close()
    before = foreign.read_bytes()
    _one_line_error(shardtune("db", "import", foreign, tmp_path / "none.jsonl"), "none.jsonl", "cannot read")
    (tmp_path / "x.jsonl").write_text(json.dumps(q4_record().to_dict()) + "\n")
    _one_line_error(shardtune("db", "import", foreign, tmp_path / "x.jsonl"), str(foreign),
                    "not a shardtune database")
    assert foreign.read_bytes() == before

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(q4_record().to_dict()) + "\n" + json.dumps({**q4_record().to_dict(), "runs": 1.5}) + "\n")
    _one_line_error(shardtune("db", "import", tmp_path / "new.db", bad), f"{bad}:2: field runs must be an integer")
    assert not (tmp_path / "new.db").exists()

    _one_line_error(shardtune("db", "export", tmp_path / "missing.db"), "missing.db: no such database")
    assert not (tmp_path / "missing.db").exists()


def test_default_database_from_environment(tmp_path):
    env = {"SHARDTUNE_DB": str(tmp_path / "env.db"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = shardtune("db", "init", env=env)
    assert proc.returncode == 0 and str(tmp_path / "env.db") in proc.stdout
    assert (tmp_path / "env.db").is_file()



def test_export_into_a_closed_pipe_is_quiet(tmp_path, q4_record):
    """`shardtune db export DB | head -1` ends without a traceback."""
    db = tmp_path / "t.db"
    with TuningDB(db) as store:
        store.add_many([q4_record(latency_us=10.0 + i, created_at=f"2026-11-26T12:{i // 60:02d}:{i % 60:02d}Z")
                        for i in range(2000)])
    proc = subprocess.Popen([sys.executable, "-m", "shardtune", "db", "export", str(db)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"{")
    proc.stdout.close()   # the reader goes away after one line
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and proc.returncode in (0, 1)


def coverage(capsys, *args):
    """`shardtune db coverage` in this process (a subprocess per case costs seconds of imports)."""
    from shardtune.cli import main
    from shardtune.database.reference import reference_files

    rc = main(["db", "coverage", str(reference_files()[0]), *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_coverage_counts_the_kernels_a_build_finds_records_for(capsys):
    rc, out, err = coverage(capsys, "--arch", "sm_90", "--models", "llama2-70b,tiny", "--shards", "1,3")
    assert rc == 0, err
    lines = out.splitlines()
    row = next(line.split() for line in lines if line.startswith("llama2-70b") and line.split()[1] == "1")
    assert row[2] == row[3] == "10"          # 10 kernels at one shard, each with a record of some GPU
    assert any(line.startswith("llama2-70b") and "not divide" in line for line in lines)   # 3 shards
    rc, out, err = coverage(capsys, "--arch", "sm_90", "--models", "llama2-70b", "--shards", "2",
                            "--kernels", "gemv", "--device", "H100")
    row = next(line.split() for line in out.splitlines() if line.startswith("llama2-70b"))
    assert rc == 0 and row[2] == row[3] == row[4] == "5"   # H100 records for all five GEMVs


@pytest.mark.parametrize("args,message", [(["--arch", "sm_99"], "unknown arch"),
                                          (["--arch", "sm_90", "--kernels", "gemv,fft"], "unknown kernel kind"),
                                          (["--arch", "sm_90", "--models", "llama9"], "unknown model"),
                                          (["--arch", "sm_90", "--shards", "two"], "comma-separated integers"),
                                          (["--arch", "sm_90", "--device", "NVIDIA"], "name one GPU")])
def test_coverage_bad_input_is_one_line(capsys, args, message):
    rc, out, err = coverage(capsys, *args)
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err


# --- refresh: a template edit that leaves a kernel's generated code as it was keeps its records ---

REFERENCE = Path(__file__).parent.parent / "database" / "reference" / "sm_90.jsonl"
OLD_HASH = "0123456789abcdef"


def _reference_gemvs(n: int) -> list:
    out = []
    for line in REFERENCE.read_text().splitlines():
        rec = check_record(json.loads(line))
        if rec.template == "q4f16_1_gemv" and rec.knobs.get("k_loop") == "serial" and rec.source_sha:
            out.append(rec)
            if len(out) == n:
                return out
    raise AssertionError("the reference has no such GEMV records")


def test_refresh_keeps_records_whose_code_is_unchanged(tmp_path):
    same, other = _reference_gemvs(2)
    # As tuned before `k_loop` existed: an older template version, one knob fewer.
    older = dataclasses.replace(same, template_hash=OLD_HASH,
                                knobs={k: v for k, v in same.knobs.items() if k != "k_loop"},
                                extra={k: v for k, v in same.extra.items() if k != "refreshed_from"})
    # Its stored code hash is not what these knobs generate now: the kernel changed, retune.
    changed = dataclasses.replace(other, template_hash=OLD_HASH, source_sha="0" * 16)
    gone = dataclasses.replace(other, template="q4f16_1_gemv_retired", template_hash=OLD_HASH)
    path = tmp_path / "t.db"
    with TuningDB(path) as db:
        db.add_many([older, changed, gone])

    proc = shardtune("db", "refresh", path, "--builders", "1", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "1 of 3 stale records refreshed" in proc.stdout, proc.stdout
    with TuningDB.open_existing(path) as db:
        valid, stale = db.validate()
    assert len(valid) == 1 and len(stale) == 3   # the old records stay
    new = valid[0]
    assert new.knobs == same.knobs and new.latency_us == same.latency_us
    assert new.extra["refreshed_from"] == OLD_HASH and Validator().reason(new) is None

    again = shardtune("db", "refresh", path, "--builders", "1", "--no-progress")
    assert again.returncode == 0 and "0 of 2 stale records refreshed" in again.stdout, again.stdout


def test_refresh_bad_input_is_one_line(tmp_path):
    _one_line_error(shardtune("db", "refresh", tmp_path / "none.db"), "none.db: no such database")
    assert not (tmp_path / "none.db").exists()
    with TuningDB(tmp_path / "t.db"):
        pass
    _one_line_error(shardtune("db", "refresh", tmp_path / "t.db", "--arch", "sm_12"), "unknown arch 'sm_12'")
