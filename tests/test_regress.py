"""`shardtune regress` and the shipped reference database (database/reference/).

CI has no GPU: the reference is imported and validated, rebuilt with --compile-only (CUDA
source through nvcc where installed), and the measuring path runs on this CPU once and with
a scripted Bench for its verdict logic."""
from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys

import pytest
import sqlite_utils

from shardtune.cli import main
from shardtune.database import Record, TuningDB, export_jsonl, import_jsonl, read_jsonl
from shardtune.database.checks import Validator, installed_tvm_version
from shardtune.database.reference import REFERENCE_DIR, open_for_build, reference_files
from shardtune.database.store import migrate, to_row
from shardtune.tuner import regress as R

REF = str(REFERENCE_DIR / "sm_90.jsonl")


def _report(path):
    with open(path) as f:
        return json.load(f)


# --- the reference database ----------------------------------------------------------------

def test_reference_imports_and_every_record_is_valid_with_provenance(tmp_path):
    assert [f.name for f in reference_files()] == ["sm_90.jsonl"]
    records = read_jsonl(REF)   # every line checked: fields, types, knobs of its template version
    added, present = import_jsonl(tmp_path / "ref.db", REF)
    assert (added, present) == (len(records), 0)
    with TuningDB.open_existing(tmp_path / "ref.db") as db:
        out = io.StringIO()
        export_jsonl(db, out)
        valid, stale = db.validate()
    assert out.getvalue() == open(REF).read()   # stored in export order: export, import, export is stable
    assert {r.shards for r in records} >= {1, 2}
    for r in records:
        assert r.arch == "sm_90" and r.device.startswith(("NVIDIA H100", "NVIDIA H200"))
        assert r.command.startswith("shardtune tune --arch sm_90") and r.created_at and r.tvm_version and r.host
        assert r.latency_us > 0 and r.max_rel_error < 1e-2
    # Stale is allowed (an older template version, another TVM: regress says so), nothing else.
    assert len(valid) + len(stale) == len(records)
    assert all(s.reason.startswith(("template ", "tuned with TVM")) for s in stale), stale


def test_compile_only_rebuilds_reference_records_of_every_template(tmp_path):
    # Four keys of each template, spread over its shapes and shard counts: the whole reference
    # (164 keys) took two of CI's 16 minutes. `db refresh` rebuilds all of it when templates change.
    with open(REF) as f:
        lines = f.readlines()
    records = read_jsonl(REF)
    by_template = {}
    for r in records:
        by_template.setdefault(r.template, set()).add((r.template, r.workload_key, r.shards))
    keys = set()
    for found in by_template.values():
        found = sorted(found)
        keys.update(found[::-(-len(found) // 4)])
    sample = tmp_path / "sample.jsonl"
    sample.write_text("".join(line for line, r in zip(lines, records, strict=True)
                              if (r.template, r.workload_key, r.shards) in keys))
    rc = main(["regress", "--db", str(sample), "--compile-only", "--json", str(tmp_path / "r.json")])
    rep = _report(tmp_path / "r.json")
    assert rc == 0 and rep["mode"] == "compile-only" and not rep["failed"]
    assert len(rep["rows"]) == len(keys) and {r["template"] for r in rep["rows"]} == set(by_template)
    # Built ("new": recorded before hashes were stored), or stale: knobs a newer template dropped.
    assert all(r["verdict"] in ("new", "same", "changed", "stale") for r in rep["rows"])
    built = [r for r in rep["rows"] if r["verdict"] != "stale"]
    assert built and all(len(r["source_sha"]) == 16 for r in built)


def test_changed_template_hash_and_changed_code_are_reported(tmp_path):
    from shardtune.tuner.measure import build
    from shardtune.tuner.targets import get_arch

    # Two reference records made current here (whatever has changed in the templates since).
    validator, current = Validator(), []
    for r in read_jsonl(REF):
        tpl = validator.template(r.template)[0]
        r = dataclasses.replace(r, template_hash=tpl.source_hash, tvm_version=installed_tvm_version())
        if validator.reason(r) is None and all(r.key != c.key for c in current):
            current.append(r)
    a, b = current[:2]
    sha = build(a.template, a.workload, a.knobs, get_arch("sm_90").target, str(tmp_path / "a.so"))[1]
    rows = [dataclasses.replace(a, source_sha=sha),                      # same code as stored
            dataclasses.replace(b, source_sha="0" * 16),                 # stored code differs
            dataclasses.replace(a, template_hash="0" * 16, shards=3, source_sha=None)]   # older template, no hash
    src = tmp_path / "x.jsonl"
    src.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in rows))
    rc = main(["regress", "--db", str(src), "--compile-only", "--json", str(tmp_path / "r.json")])
    got = {(r["template"], r["shards"], r["stored_source_sha"]): (r["state"], r["verdict"])
           for r in _report(tmp_path / "r.json")["rows"]}
    assert rc == 0
    assert got == {(a.template, a.shards, sha): ("current", "same"),
                   (b.template, b.shards, "0" * 16): ("current", "changed"),
                   (a.template, 3, None): ("template changed", "new")}


def test_without_a_gpu_measuring_is_one_line_and_nonzero():
    from shardtune.tuner.targets import local_gpu_arch

    if local_gpu_arch():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, "-m", "shardtune", "regress", "--db", REF],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardtune: error: no GPU here") and "--compile-only" in lines[0]


# --- verdicts ----------------------------------------------------------------------------------

def test_verdict_needs_both_the_threshold_and_the_spread():
    v = R.verdict
    assert v(10.0, 0.1, 10.2, 0.1, 0.05) == "same"      # within the threshold
    assert v(10.0, 0.1, 12.0, 0.1, 0.05) == "slower"    # beyond both
    assert v(10.0, 0.1, 8.0, 0.1, 0.05) == "faster"
    assert v(10.0, 0.8, 11.0, 0.8, 0.05) == "same"      # 10% slower, but within the spread (1.6)
    assert v(10.0, 0.01, 10.3, 0.01, 0.05) == "same"    # beyond the spread, within 5%
    assert v(10.0, 0.01, 10.3, 0.01, 0.0) == "slower"   # threshold 0: the spread alone decides
    assert R.parse_threshold("5%") == pytest.approx(0.05) and R.parse_threshold("0.1") == pytest.approx(0.1)
    with pytest.raises(Exception, match="threshold"):
        R.parse_threshold("fast")


def test_repeats_combine_to_median_and_widest_spread():
    assert R.combine([10.0, 10.4, 10.1], [0.05, 0.1, 0.02]) == (10.1, pytest.approx(0.4))  # medians strayed
    assert R.combine([10.0, 10.0, 10.0], [0.3, 0.1, 0.2]) == (10.0, 0.3)                   # one repeat was noisy


def _db(path, records):
    with TuningDB(path) as db:
        db.add_many(records)
    return str(path)


def test_baseline_db_comparison(tmp_path, make_record):
    def rec(n, us, spread=0.1, **kw):
        return make_record(workload={"N": n, "K": 512, "batch": 1}, latency_us=us, latency_spread_us=spread, **kw)

    base = _db(tmp_path / "base.db", [rec(1, 10.0), rec(2, 10.0), rec(3, 10.0), rec(4, 10.0, 0.8),
                                      rec(5, 10.0), rec(6, 10.0), rec(8, 10.0, device="other GPU")])
    new = _db(tmp_path / "new.db", [rec(1, 10.2), rec(2, 12.0), rec(3, 8.0), rec(4, 11.0, 0.8),
                                    rec(5, 10.0), rec(7, 10.0), rec(8, 20.0),
                                    rec(1, 30.0)])   # a slower record of key 1: the best one counts
    out = tmp_path / "r.json"
    rc = main(["regress", "--db", new, "--baseline-db", base, "--json", str(out)])
    got = {r["workload"]["N"]: r["verdict"] for r in _report(out)["rows"]}
    assert got == {1: "same", 2: "slower", 3: "faster", 4: "same", 5: "same", 6: "vanished",
                   7: "appeared", 8: "other device"}
    assert rc == 1   # key 2 is a regression
    assert main(["regress", "--db", new, "--baseline-db", base, "--template", "nosuch"]) == 0


# --- the measuring path ---------------------------------------------------------------------------

def test_measuring_on_this_cpu(tmp_path):
    """The real path end to end (build, numerics, timing, repeats) on a small CPU kernel; the
    stored latency is made up and far too slow, so the verdict is certain."""
    from shardtune.kernels import get_template
    from shardtune.tuner.targets import host_arch, target_of

    a = host_arch()
    tpl, wl = get_template("rms_norm"), {"batch": 1, "H": 256}
    rec = Record(template=tpl.name, template_hash=tpl.source_hash, workload=wl, arch=a.name, shards=1,
                 device="test CPU", compute_units=1, knobs=tpl.default_knobs(wl, target_of(a)),
                 latency_us=1e6, latency_spread_us=1.0, runs=10, bandwidth_gbps=1e-6, max_rel_error=1e-4,
                 tvm_version=installed_tvm_version())
    src = tmp_path / "cpu.jsonl"
    src.write_text(json.dumps(rec.to_dict()) + "\n")
    rc = main(["regress", "--db", str(src), "--arch", "cpu", "--repeats", "2", "--json", str(tmp_path / "r.json")])
    (row,) = _report(tmp_path / "r.json")["rows"]
    assert rc == 0 and row["verdict"] == "faster" and len(row["repeats_us"]) == 2
    assert 0 < row["now_us"] < 1e6 and row["source_sha"]


class ScriptedBench:
    """Bench's interface, with measurements scripted per template workload N (no TVM)."""
    script: dict = {}

    def __init__(self, target_json, device_type, builders=None, remote=None):
        import tempfile

        self.dir, self.lost, self.source_sha, self._n = tempfile.mkdtemp(), {}, {}, 0
        self.ceiling_gbps = float("inf")

    def copy_bandwidth(self):
        return 3000.0

    def build_each(self, jobs):
        out = []
        for _, wl, _ in jobs:
            if self.script[wl["N"]] == "build error":
                out.append((None, "build: boom"))
                continue
            self._n += 1
            path = f"{self.dir}/c{self._n}.so"
            open(path, "w").write(str(wl["N"]))
            self.source_sha[path] = "ab" * 8
            out.append((path, ""))
        return out

    def measure_many(self, jobs):
        from shardtune.tuner.measure import Measurement

        out = []
        for path, _, wl in jobs:
            s = self.script[wl["N"]]
            out.append(Measurement(error=s) if isinstance(s, str) else Measurement(s.pop(0), 0.05, 10, 1e-4))
        return out

    def close(self):
        pass


def test_measure_verdicts_with_scripted_measurements(monkeypatch, make_record):
    from shardtune.tuner import api, measure
    from shardtune.tuner.targets import get_arch

    ScriptedBench.script = {1: [10.0, 10.1, 9.9], 2: [12.0, 12.1, 12.2], 3: [9.0, 12.0, 11.0],
                            4: "numerics: relative error 0.5 > 0.001", 5: "build error", 6: "run: crashed",
                            7: [10.0, 10.0, 10.0]}
    monkeypatch.setattr(measure, "Bench", ScriptedBench)
    monkeypatch.setattr(api, "_device_description", lambda *a: {"device": "test GPU"})
    rows = [R.Row(r, "current", r.latency_us, r.latency_spread_us)
            for r in (make_record(workload={"N": n, "K": 512, "batch": 1}) for n in range(1, 7))]
    rows.append(R.Row(make_record(knobs={"rows": 3, "vec": 1}), "template changed", 10.0, 0.2))  # not in the space
    # Stored from back-to-back CUDA-graph replays, re-measured one launch at a time: no comparison.
    graph_timed = make_record(workload={"N": 7, "K": 512, "batch": 1}, extra={"timing": "graph"})
    rows.append(R.Row(graph_timed, "current", 10.0, 0.2))
    R.measure_rows(rows, get_arch("sm_90"), "cuda", 0.05, 3)
    got = [(r.verdict, r.now_us) for r in rows]
    assert got[0] == ("same", 10.0) and got[1] == ("slower", 12.1)
    assert got[2] == ("same", 11.0)                      # +10% median, but the repeats spread over 3 us
    assert [v for v, _ in got[3:]] == ["wrong", "failed", "failed", "stale", "stale"]
    assert rows[3].note.startswith("numerics") and "retune" in rows[6].note
    assert rows[7].note == "stored time was graph-timed, now launch-timed"


# --- source hashes and the schema -------------------------------------------------------------

def test_source_sha_is_stable_for_llvm(tmp_path):
    """LLVM IR names alias-analysis nodes by heap address: the hash must not see them."""
    from shardtune.kernels import get_template
    from shardtune.tuner.measure import build
    from shardtune.tuner.targets import host_arch, target_of

    a = host_arch()
    tpl, wl = get_template("rms_norm"), {"batch": 1, "H": 256}
    knobs = tpl.default_knobs(wl, target_of(a))
    shas = {build(tpl.name, wl, knobs, a.target, str(tmp_path / f"{i}.so"))[1] for i in range(2)}
    assert len(shas) == 1


def test_heap_addresses_in_alias_node_names_do_not_reach_the_hash():
    """Kernels that allocate buffers (the CPU attention) name TBAA nodes "<address>.w4.b0": the
    hash of one kernel differed from process to process until these were renumbered too."""
    from shardtune.tuner.measure import stable_text

    ir = ('!1 = !{!"0x5591e0a38bc0", !2}\n!3 = !{!"0x5591e0a38bc0.w4.b0", !1, i64 0}\n'
          '!4 = !{!"0x7f00aa.w8.b0", !3, i64 0}\n')
    other_run = ir.replace("5591e0a38bc0", "55835c49ed50").replace("7f00aa", "61beef")
    assert stable_text(ir) == stable_text(other_run)
    assert stable_text(ir) != stable_text(ir.replace("w8", "w16"))   # the rest of a name still counts
    # a whole-string address reads as before the renumbering covered longer names
    assert stable_text('!{!"0xabc", !{!"0xdef"}, !"0xabc"}') == '!{!"p0", !{!"p1"}, !"p0"}'


def test_source_sha_is_optional_and_old_files_stay_readable(tmp_path, make_record):
    old, new = make_record(), make_record(latency_us=9.0, source_sha="12" * 8)
    assert "source_sha" not in old.to_dict() and new.to_dict()["source_sha"] == "12" * 8
    path = tmp_path / "v2.db"
    db = sqlite_utils.Database(path)
    with db.atomic():
        migrate(db, 0, 2)
        db["records"].insert(to_row(old))
    db.close()
    with TuningDB.open_existing(path) as ro:
        assert ro.schema_version == 2 and ro.records() == [old]
    with TuningDB(path) as rw:   # upgraded in place, then holds both kinds
        rw.add(new)
        assert sorted(rw.records(), key=lambda r: r.latency_us) == [new, old]


# --- build without --db ---------------------------------------------------------------------------

def test_build_falls_back_to_the_reference(tmp_path, monkeypatch, make_record):
    from shardtune.database import reference

    ref = tmp_path / "reference"   # a reference of current records, whatever the shipped one holds now
    ref.mkdir()
    (ref / "sm_90.jsonl").write_text(json.dumps(make_record(latency_us=5.0).to_dict()) + "\n")
    monkeypatch.setattr(reference, "REFERENCE_DIR", ref)
    monkeypatch.setenv("SHARDTUNE_DB", str(tmp_path / "none.db"))
    log = io.StringIO()
    store, name = open_for_build("sm_90", 1, log)
    assert name == str(ref) and "using the reference database" in log.getvalue()
    assert [r.latency_us for r in store.best_per_key(arch="sm_90", shards=1)] == [5.0]
    store.close()
    assert open_for_build("sm_90", 2, io.StringIO()) == (None, None)   # nothing for 2 shards
    assert open_for_build("cpu", 1, io.StringIO()) == (None, None)

    _db(tmp_path / "mine.db", [make_record()])     # a current sm_90 x1 record of the user's own
    monkeypatch.setenv("SHARDTUNE_DB", str(tmp_path / "mine.db"))
    log = io.StringIO()
    store, name = open_for_build("sm_90", 1, log)
    assert name == str(tmp_path / "mine.db") and log.getvalue() == ""
    assert [r.latency_us for r in store.best_per_key(arch="sm_90", shards=1)] == [10.0]
    store.close()
