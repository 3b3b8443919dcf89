"""MetaScheduleDB: MetaSchedule and Relax reading and writing the shardtune file."""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import pytest
import sqlite_utils
import tvm
from tvm import relax, s_tir
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.database import TuningRecord
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from shardtune.database import TuningDB
from shardtune.database.metaschedule import MetaScheduleDB

TARGET = tvm.target.Target({"kind": "llvm", "num-cores": 2})


@T.prim_func(s_tir=True)
def matmul(A: T.Buffer((32, 32), "float32"), B: T.Buffer((32, 32), "float32"),
           C: T.Buffer((32, 32), "float32")):
    T.func_attr({"tirx.noalias": True, "global_symbol": "main"})
    for i, j, k in T.grid(32, 32, 32):
        with T.sblock("C"):
            vi, vj, vk = T.axis.remap("SSR", [i, j, k])
            with T.init():
                C[vi, vj] = T.float32(0)
            C[vi, vj] = C[vi, vj] + A[vi, vk] * B[vk, vj]


@I.ir_module
class MatmulModel:
    @T.prim_func(s_tir=True)
    def matmul(A: T.Buffer((32, 32), "float32"), B: T.Buffer((32, 32), "float32"),
               C: T.Buffer((32, 32), "float32")):
        T.func_attr({"tirx.noalias": True})
        for i, j, k in T.grid(32, 32, 32):
            with T.sblock("C"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                with T.init():
                    C[vi, vj] = T.float32(0)
                C[vi, vj] = C[vi, vj] + A[vi, vk] * B[vk, vj]

    @R.function
    def main(a: R.Tensor((32, 32), "float32"), b: R.Tensor((32, 32), "float32")):
        cls = MatmulModel
        return R.call_tir(cls.matmul, (a, b), out_ty=R.Tensor((32, 32), "float32"))


def _split_rows(mod, factor):
    sch = s_tir.Schedule(mod)
    i, _, _ = sch.get_loops(sch.get_sblock("C"))
    sch.split(i, [None, factor])
    return sch


def _commit(db, mod, factor, run_secs):
    wl = db.commit_workload(mod)
    db.commit_tuning_record(TuningRecord(_split_rows(mod, factor).trace, wl, run_secs=run_secs, target=TARGET,
                                         args_info=ms.arg_info.ArgInfo.from_prim_func(mod["main"])))


def _inputs():
    rng = np.random.default_rng(0)
    return rng.random((32, 32), dtype=np.float32), rng.random((32, 32), dtype=np.float32)


def test_records_survive_reopening_and_rank_like_metaschedule(tmp_path):
    path = tmp_path / "tuning.db"
    mod = tvm.IRModule({"main": matmul})
    db = MetaScheduleDB(path)
    assert not db.has_workload(mod)
    for factor, secs in [(4, [2e-3]), (8, [1e-3, 1.2e-3]), (16, None), (2, [1e10])]:
        _commit(db, mod, factor, secs)
    assert db.has_workload(mod) and len(db) == 4
    db.close()

    db = MetaScheduleDB(path)  # a new object, reading only the file
    assert len(db) == 4 and len(db.get_all_tuning_records()) == 4
    top = db.get_top_k(db.commit_workload(mod), 5)  # unmeasured and failed records never rank
    assert [[float(s) for s in r.run_secs] for r in top] == [[1e-3, 1.2e-3], [2e-3]]
    sch = ms.tir_integration.compile_tir(db, matmul, TARGET)
    assert "factors=[None, 8]" in str(sch.trace)
    a, b = _inputs()
    c = tvm.runtime.tensor(np.zeros((32, 32), "float32"))
    tvm.compile(sch.mod, target=TARGET)(tvm.runtime.tensor(a), tvm.runtime.tensor(b), c)
    np.testing.assert_allclose(c.numpy(), a @ b, rtol=1e-5)

    # The same file is still a shardtune database, and its MetaSchedule rows read plainly.
    with TuningDB.open_existing(path) as store:
        assert store.stats()["ms_tuning_records"] == 4
    rows = list(sqlite_utils.Database(path)["ms_tuning_records"].rows)
    assert [r["measured"] for r in rows] == [1, 1, 0, 0]
    assert all('"llvm"' in r["target"] for r in rows)


def test_relax_applies_records_from_the_file(tmp_path):
    path = tmp_path / "tuning.db"
    [task] = ms.relax_integration.extract_tasks(MatmulModel, TARGET)
    db = MetaScheduleDB(path)
    _commit(db, task.dispatched[0], 8, [1e-3])
    db.close()

    before = path.read_bytes()
    db = MetaScheduleDB(path, readonly=True)  # as a compiler would: only reading
    with TARGET, db, tvm.transform.PassContext(opt_level=3):
        applied = relax.transform.MetaScheduleApplyDatabase()(MatmulModel)
    assert applied["matmul"].attrs["tirx.is_scheduled"]
    assert path.read_bytes() == before
    vm = relax.VirtualMachine(tvm.compile(applied, target=TARGET), tvm.cpu())
    a, b = _inputs()
    out = vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b)).numpy()
    np.testing.assert_allclose(out, a @ b, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SHARDTUNE_SLOW_TESTS") != "1",
                    reason="tune_tir needs ~50 s here (TVM's tensor_intrin import alone takes ~24 s, twice); "
                           "SHARDTUNE_SLOW_TESTS=1 runs it")
def test_tune_tir_into_the_file_then_compile(tmp_path):
    path = tmp_path / "tuning.db"
    start = time.time()
    ms.tune_tir(matmul, target=TARGET, work_dir=tempfile.mkdtemp(dir=tmp_path), max_trials_global=4,
                num_trials_per_iter=4, builder=ms.builder.LocalBuilder(max_workers=1, timeout_sec=300),
                runner=ms.runner.LocalRunner(evaluator_config=ms.runner.EvaluatorConfig(number=1, repeat=1)),
                database=MetaScheduleDB(path), cost_model=ms.cost_model.RandomModel(), seed=0)
    print(f"tune_tir: {time.time() - start:.1f} s")
    db = MetaScheduleDB(path)
    assert len(db) >= 1
    sch = ms.tir_integration.compile_tir(db, matmul, TARGET)
    assert sch is not None
    a, b = _inputs()
    c = tvm.runtime.tensor(np.zeros((32, 32), "float32"))
    tvm.compile(sch.mod, target=TARGET)(tvm.runtime.tensor(a), tvm.runtime.tensor(b), c)
    np.testing.assert_allclose(c.numpy(), a @ b, rtol=1e-5)
