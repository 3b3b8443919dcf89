"""Real CPU tuning of the `tiny` model into real SQLite files."""
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

import shardtune
from shardtune.database import TuningDB
from shardtune.kernels import get_template
from shardtune.tuner.search import open_storage

TUNE = [sys.executable, "-c", "import sys; from shardtune.cli import tune_main; sys.exit(tune_main())"]


def tune_cli(*args, timeout=300):
    return subprocess.run([*TUNE, *args], capture_output=True, text=True, timeout=timeout)


def stored_trials(studies_path):
    storage = open_storage(str(studies_path))   # the tuner's lock: never race its table creation
    return {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage).trials
            for s in optuna.study.get_all_study_summaries(storage)}


def finished_trials(studies_path):
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    return {name: sum(t.state in done for t in trials) for name, trials in stored_trials(studies_path).items()}


def test_cpu_tune_writes_checked_records(tmp_path):
    db = tmp_path / "t.db"
    recs = shardtune.tune(arch="cpu", shards=1, model="tiny", db=str(db), trials_per_kernel=3, progress=False)
    store = TuningDB.open_existing(db)
    assert len(store) == len(recs) >= 4            # 4 distinct kernels in tiny, up to 3 records each
    valid, stale = store.validate()
    assert not stale
    kernels = {(r.template, r.workload["N"], r.workload["K"]) for r in recs}
    # tiny's 4-bit LM head (vocabulary 512 x hidden 256) has QKV's shape: one kernel for both
    assert kernels == {("q4f16_1_gemv", 512, 256), ("q4f16_1_gemv_residual", 256, 256),
                       ("q4f16_1_gemv_silu_mul", 1024, 256), ("q4f16_1_gemv_residual", 256, 512)}
    for r in recs:
        tpl = get_template(r.template)
        assert r.max_rel_error < tpl.tolerance and r.latency_us > 0 and r.runs >= 10
        assert r.template_hash == tpl.source_hash and r.status == "complete" and r.trials == 3
    best = store.best(recs[0].template, recs[0].workload, recs[0].arch, 1)
    assert best.latency_us == min(r.latency_us for r in recs if r.workload == recs[0].workload)


def test_a_spent_budget_still_gives_every_kernel_a_small_round(tmp_path):
    """With the time budget gone before a kernel's turn, it still gets one round of at most
    LATE_ROUND candidates: every kernel ends with a record, none with a full search."""
    from shardtune.tuner.search import LATE_ROUND

    recs = shardtune.tune(arch="cpu", shards=1, model="tiny", db=str(tmp_path / "t.db"), time_budget=0.01,
                          trials_per_kernel=8, progress=False)
    assert {(r.template, r.workload["N"], r.workload["K"]) for r in recs} == {
        ("q4f16_1_gemv", 512, 256), ("q4f16_1_gemv_residual", 256, 256), ("q4f16_1_gemv_silu_mul", 1024, 256),
        ("q4f16_1_gemv_residual", 256, 512)}
    assert all(r.trials <= LATE_ROUND and r.status == "partial" for r in recs)


def test_resume_after_kill(tmp_path):
    db = tmp_path / "t.db"
    studies = tmp_path / "t.studies.db"
    log = open(tmp_path / "first.log", "w+")
    proc = subprocess.Popen([*TUNE, "--arch", "cpu", "--model", "tiny", "--db", str(db), "--no-progress",
                             "--trials-per-kernel", "40"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            time.sleep(1)
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
            if studies.exists():
                counts = finished_trials(studies)
                if counts and max(counts.values()) >= 3:
                    break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    before = finished_trials(studies)
    assert before, (tmp_path / "first.log").read_text()[-2000:]
    first, done = max(before.items(), key=lambda kv: kv[1])
    assert done >= 3
    r = tune_cli("--arch", "cpu", "--model", "tiny", "--db", str(db), "--no-progress",
                 "--trials-per-kernel", str(done + 1))
    assert r.returncode == 0, r.stderr
    stored = stored_trials(studies)
    # Only measured trials are stored, each whole: a kill leaves none running or half-told.
    for t in (t for trials in stored.values() for t in trials):
        assert t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL), t
        assert ("runs" if t.state == optuna.trial.TrialState.COMPLETE else "error") in t.user_attrs, t
    assert len(stored[first]) == done + 1   # the killed run's trials were kept, one more was made
    recs = TuningDB.open_existing(db).records()
    assert {rec.trials for rec in recs} == {done + 1}
    # kept trials carry how they were timed into their records (CPUs: one call at a time)
    assert {rec.extra["timing"] for rec in recs} == {"launch"}


def test_concurrent_tuners_lose_nothing(tmp_path):
    db = str(tmp_path / "t.db")
    procs = [subprocess.Popen([*TUNE, "--arch", "cpu", "--model", "tiny", "--db", db, "--no-progress",
                               "--trials-per-kernel", "2", "--seed", str(s), "--builders", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in (1, 2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-500:] for o in outs]
    store = TuningDB.open_existing(db)
    assert len(store) >= 8 and not store.validate()[1]
    # Both processes' closing tables appear: each ran every kernel.
    assert all(o[0].count("_gemv") == 4 for o in outs)


@pytest.mark.parametrize("args,message", [
    (["--arch", "gfx1100"], "needs a local gfx1100 GPU"),
    (["--arch", "sm_99"], "unknown arch 'sm_99'"),
    (["--arch", "cpu", "--model", "llama2-70b", "--shards", "3"], "3 shards do not divide"),
    (["--arch", "cpu", "--model", "gpt5"], "unknown model"),
    (["--arch", "cpu", "--kernels", "conv"], "unknown kernel kind"),
    (["--arch", "cpu", "--time-budget", "soon"], "--time-budget"),
])
def test_bad_input_is_one_line(tmp_path, capfd, args, message):
    # In this process (a subprocess spends 4 s importing TVM); the tests around run the real one.
    from shardtune.cli import tune_main

    db = tmp_path / "t.db"
    assert tune_main([*args, "--db", str(db), "--no-progress"]) == 2
    err = capfd.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not db.exists()


def test_corrupt_database_is_refused_untouched(tmp_path):
    db = tmp_path / "t.db"
    db.write_bytes(b"this is not sqlite" * 100)
    before = db.read_bytes()
    r = tune_cli("--arch", "cpu", "--db", str(db), "--no-progress", "--trials-per-kernel", "1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert db.read_bytes() == before


def test_dry_run_builds_cuda_candidates_without_a_gpu(tmp_path):
    r = tune_cli("--arch", "sm_90", "--dry-run", "--model", "tiny", "--trials-per-kernel", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("2/2 built") == 4   # the LM head shares QKV's shape in tiny


def _rocm_available() -> bool:
    from shardtune.errors import UserError
    from shardtune.tuner.targets import prepare_rocm

    try:
        prepare_rocm()
        return True
    except UserError:
        return False


@pytest.mark.skipif(not _rocm_available(), reason="needs rocm-device-libs and ld.lld (.ci/run installs them)")
@pytest.mark.parametrize("arch", ["gfx1100", "gfx90a"])
def test_dry_run_builds_amd_code_objects_without_a_gpu(arch):
    r = tune_cli("--arch", arch, "--dry-run", "--model", "tiny", "--trials-per-kernel", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("2/2 built") == 4   # the LM head shares QKV's shape in tiny


def test_missing_rocm_bitcode_is_one_line(tmp_path):
    env = {**os.environ, "ROCM_PATH": str(tmp_path)}
    r = subprocess.run([*TUNE, "--arch", "gfx1100", "--dry-run", "--no-progress"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 2 and "ROCm device bitcode" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_budget_shares_follow_a_decode_steps_time():
    """The big GEMVs get most of a time budget, and no kernel gets under a third of an even share."""
    from shardtune.tuner.api import budget_shares
    from shardtune.tuner.workloads import kernel_instances

    insts = kernel_instances("llama2-70b", 2, ["gemv", "norm", "attention"])
    shares = budget_shares(insts)
    total = sum(shares)
    gate_up = shares[[i.template for i in insts].index("q4f16_1_gemv_silu_mul")]
    assert gate_up == max(shares) and gate_up > total / 4
    # the small kernels (norms, RoPE, short attention) all sit at the same floor, still a real share
    floor = min(shares)
    assert shares.count(floor) >= 3 and floor > total / len(shares) / 6


@pytest.mark.parametrize("name, wl", [
    ("q4f16_1_gemv", {"batch": 1, "N": 64, "K": 256, "quant": "q4f16_1"}),
    ("rope_kv_append", {"batch": 1, "q_heads": 4, "kv_heads": 2, "head_dim": 32, "capacity": 16,
                        "theta": 10000.0, "dtype": "float16"}),   # its own relative_error, caches in place
])
def test_measuring_a_workload_again_reuses_its_inputs_and_reference(monkeypatch, tmp_path, name, wl):
    """A search measures one workload many times: the inputs and the NumPy reference are made once
    per process, and a wrong candidate is still caught by the template's own check."""
    from shardtune.tuner import measure

    tpl = get_template(name)
    calls = []
    compute = type(tpl).reference
    monkeypatch.setattr(type(tpl), "reference", lambda self, inputs: calls.append(1) or compute(self, inputs))
    monkeypatch.setattr(measure, "_CASES", type(measure._CASES)())
    vars(tpl).pop("reference", None)   # the shortcut measuring installs, from an earlier test
    try:
        _measure_three_times_and_a_wrong_one(tpl, name, wl, tmp_path, calls)
    finally:   # the shortcut wraps this test's counting reference: not for later tests
        vars(tpl).pop("reference", None)


def _measure_three_times_and_a_wrong_one(tpl, name, wl, tmp_path, calls):
    import tvm

    from shardtune.tuner import measure

    target = tvm.target.Target({"kind": "llvm"})
    knobs = tpl.default_knobs(wl, target)
    path = str(tmp_path / "k.so")
    measure.build(name, wl, knobs, {"kind": "llvm"}, path)
    runs = [measure.measure_on(tvm.cpu(0), lambda: tvm.runtime.load_module(path), name, wl, repeat=2)
            for _ in range(3)]
    assert len(calls) == 1 and all("error" not in r and r["rel_error"] < tpl.tolerance for r in runs), runs
    # a kernel that writes nothing: its outputs keep the NaN they were poisoned with
    wrong = measure.measure_on(tvm.cpu(0), lambda: {"main": lambda *args: None}, name, wl, repeat=2)
    assert "numerics" in wrong["error"] and len(calls) == 1


def test_missing_only_tunes_just_the_kernels_without_a_record(tmp_path):
    import io

    from shardtune.tuner.api import _without_records
    from shardtune.tuner.workloads import kernel_instances

    db = str(tmp_path / "t.db")
    (rec,) = shardtune.tune(arch="cpu", shards=1, model="tiny", db=db, trials_per_kernel=1, progress=False,
                            kernels=["norm"], time_budget=0.01)
    out = io.StringIO()
    assert shardtune.tune(arch="cpu", shards=1, model="tiny", db=db, progress=False, kernels=["norm"],
                          missing_only=True, out=out) == []   # nothing left to tune
    assert f"1 of 1 kernels already have a record from {rec.device}" in out.getvalue()
    # At 2 shards the norm has the same workload (the 1-shard record serves); the GEMVs do not.
    wanted = kernel_instances("tiny", 2, ["gemv", "norm"])
    left = _without_records(wanted, TuningDB.open_existing(db), rec.arch, 2, rec.device, io.StringIO())
    assert [i.template for i in wanted if i not in left] == ["rms_norm"]
    assert _without_records(wanted, TuningDB.open_existing(db), rec.arch, 2, "another CPU", io.StringIO()) == wanted


def test_warm_start_from_records_of_an_older_knob_space(tmp_path, monkeypatch):
    """Records are warm-start hints even when stale, the workload's own first. A knob the template
    gained since takes its first value (check() may index it: a missing one crashed a tune once);
    knobs outside today's space are dropped."""
    from shardtune.database import Record
    from shardtune.database.checks import installed_tvm_version
    from shardtune.tuner.api import _warm_knobs
    from shardtune.tuner.targets import get_arch, target_of

    tpl, cpu = get_template("q4f16_1_gemv"), target_of(get_arch("cpu"))
    wl = {"batch": 1, "N": 256, "K": 512, "quant": "q4f16_1"}
    knobs = tpl.default_knobs(wl, cpu)
    db = TuningDB(tmp_path / "t.db")

    def add(wl, knobs):
        db.add(Record(template=tpl.name, template_hash=tpl.source_hash, workload=wl, arch="cpu", shards=1,
                      device="cpu", compute_units=2, knobs=knobs, latency_us=10.0, latency_spread_us=0.1,
                      runs=10, bandwidth_gbps=1.0, max_rel_error=1e-4, tvm_version=installed_tvm_version()))
    add(wl, knobs)
    other = {**wl, "N": 512}
    assert _warm_knobs(db, tpl, other, "cpu", cpu) == [knobs]
    second = {**knobs, list(knobs)[0]: tpl.cpu_knobs[list(knobs)[0]][-1]}
    assert second != knobs
    add(other, second)
    assert _warm_knobs(db, tpl, other, "cpu", cpu) == [second, knobs]   # its own workload's first
    monkeypatch.setattr(tpl, "cpu_knobs", {**tpl.cpu_knobs, "split": [0, 2]})
    monkeypatch.setattr(tpl, "check", lambda wl, knobs, target: None if knobs["split"] == 0 else "no split")
    assert {"split": 0, **knobs} in _warm_knobs(db, tpl, other, "cpu", cpu)
    monkeypatch.setattr(tpl, "cpu_knobs", {k: v for k, v in tpl.cpu_knobs.items() if k != list(knobs)[0]})
    assert _warm_knobs(db, tpl, other, "cpu", cpu) == []


def test_warm_start_takes_the_workloads_fastest_then_the_nearest_shapes(tmp_path):
    """The workload's own records fastest first (not oldest first), two at most before the other
    shapes' winners, nearest shape first: replayed searches from such a mix missed less often."""
    from shardtune.database import Record
    from shardtune.database.checks import installed_tvm_version
    from shardtune.tuner.api import _warm_knobs
    from shardtune.tuner.targets import get_arch, target_of

    tpl, cpu = get_template("q4f16_1_gemv"), target_of(get_arch("cpu"))
    wl = {"batch": 1, "N": 256, "K": 512, "quant": "q4f16_1"}
    db = TuningDB(tmp_path / "t.db")
    settings = [{"rows": r, "lanes": 16, "unroll": 1} for r in (1, 4, 16, 64)] + [{"rows": 4, "lanes": 8, "unroll": 2}]

    def add(wl, knobs, us):
        db.add(Record(template=tpl.name, template_hash=tpl.source_hash, workload=wl, arch="cpu", shards=1,
                      device="cpu", compute_units=2, knobs=knobs, latency_us=us, latency_spread_us=0.1,
                      runs=10, bandwidth_gbps=1.0, max_rel_error=1e-4, tvm_version=installed_tvm_version()))
    add({**wl, "N": 4096}, settings[4], 1.0)   # far, and fastest of all
    add(wl, settings[0], 10.0)                 # own, oldest
    add(wl, settings[1], 8.0)                  # own, fastest
    add(wl, settings[2], 12.0)                 # own, third
    add({**wl, "N": 512}, settings[3], 20.0)   # near
    assert _warm_knobs(db, tpl, wl, "cpu", cpu) == [settings[1], settings[0], settings[3], settings[4]]
    assert _warm_knobs(db, tpl, wl, "cpu", cpu, limit=6)[-1] == settings[2]   # own again after the others


@pytest.mark.parametrize("arch, trials", [("cpu", 48), ("sm_90", 128), ("gfx1100", 128)])
def test_default_trials_follow_the_arch(monkeypatch, arch, trials):
    """GPU candidates measure in a fraction of a second, CPU ones in seconds: the defaults differ."""
    from shardtune.tuner import api

    seen = []
    monkeypatch.setattr(api, "_dry_run", lambda instances, target, bench, n, seed, out: seen.append(n) or [])
    assert api.tune(arch=arch, shards=1, model="tiny", dry_run=True, progress=False) == []
    assert seen == [trials]
