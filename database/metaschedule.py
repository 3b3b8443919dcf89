"""MetaSchedule's Database interface over the shardtune SQLite file, so `ms.tune_tir` /
`ms.tune_tasks` can tune into it and `relax.transform.MetaScheduleApplyDatabase` /
`ms.tir_integration.compile_tir` can read from it.

Rows live in ms_workloads / ms_tuning_records next to the shardtune records. Content
is MetaSchedule's own JSON, read back with json + TVM's from_json: never unpickled
or evaluated."""
from __future__ import annotations

import json
import os
import threading

import tvm_ffi
from tvm.ir import IRModule
from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.database import PyDatabase, TuningRecord, Workload

from .store import TuningDB

# MetaSchedule's stand-in for "no measurement" (SortTuningRecordByMeanRunSecs::kMaxMeanTime).
_MAX_MEAN_TIME = 1e10


def _mean_run_secs(record: TuningRecord) -> tuple[float, bool]:
    """(mean seconds, measured?) with MetaSchedule's rules: a record without run times,
    or whose run times are all the stand-in, is never among the top k."""
    secs = [float(s) for s in (record.run_secs or [])]
    if not secs:
        return _MAX_MEAN_TIME, False
    return sum(secs) / len(secs), any(s != _MAX_MEAN_TIME for s in secs)


@derived_object
class MetaScheduleDB(PyDatabase):
    """A MetaSchedule database stored in the shardtune database at `path` (default:
    default_db_path()). `readonly=True` only queries an existing file (e.g. to compile)."""

    def __init__(self, path: str | os.PathLike | None = None, readonly: bool = False):
        super().__init__()
        self.store = TuningDB(path, readonly=readonly)
        self._lock = threading.RLock()  # MetaSchedule may call in from its worker threads
        self._workloads: dict[int, Workload] = {}  # row id -> parsed workload

    def close(self) -> None:
        self.store.close()

    # --- workloads ------------------------------------------------------------------
    def _find(self, mod: IRModule) -> tuple[int | None, Workload | None]:
        shash = str(tvm_ffi.structural_hash(mod))
        rows = self.store.conn.execute("SELECT id, workload FROM ms_workloads WHERE shash = ? ORDER BY id",
                                       (shash,)).fetchall()
        for wid, text in rows:
            wl = self._workload(wid, text)
            if tvm_ffi.structural_equal(wl.mod, mod):
                return wid, wl
        return None, None

    def _workload(self, wid: int, text: str | None = None) -> Workload:
        if wid not in self._workloads:
            if text is None:
                text = self.store.conn.execute("SELECT workload FROM ms_workloads WHERE id = ?",
                                               (wid,)).fetchone()[0]
            self._workloads[wid] = Workload.from_json(json.loads(text))
        return self._workloads[wid]

    def has_workload(self, mod: IRModule) -> bool:
        with self._lock:
            return self._find(mod)[0] is not None

    def commit_workload(self, mod: IRModule) -> Workload:
        with self._lock:
            return self._commit_workload(mod)[1]

    def _commit_workload(self, mod: IRModule) -> tuple[int, Workload]:
        wid, wl = self._find(mod)
        if wid is not None:
            return wid, wl
        wl = Workload(mod)
        with self.store.write() as db:
            wid = db["ms_workloads"].insert({"shash": str(tvm_ffi.structural_hash(mod)),
                                             "workload": json.dumps(wl.as_json())}).last_pk
        self._workloads[wid] = wl
        return wid, wl

    # --- tuning records --------------------------------------------------------------
    def commit_tuning_record(self, record: TuningRecord) -> None:
        with self._lock:
            wid, _ = self._commit_workload(record.workload.mod)
            mean, measured = _mean_run_secs(record)
            with self.store.write() as db:
                db["ms_tuning_records"].insert({
                    "workload_id": wid, "mean_run_secs": mean, "measured": int(measured),
                    "run_secs": json.dumps([float(s) for s in (record.run_secs or [])]),
                    "target": str(record.target) if record.target is not None else None,
                    "record": json.dumps(record.as_json()),
                })

    def get_top_k(self, workload: Workload, top_k: int) -> list[TuningRecord]:
        with self._lock:
            wid, wl = self._find(workload.mod)
            if wid is None or top_k <= 0:
                return []
            rows = self.store.conn.execute(
                "SELECT record FROM ms_tuning_records WHERE workload_id = ? AND measured = 1 "
                "ORDER BY mean_run_secs, id LIMIT ?", (wid, top_k)).fetchall()
            return [TuningRecord.from_json(json.loads(text), wl) for (text,) in rows]

    def get_all_tuning_records(self) -> list[TuningRecord]:
        with self._lock:
            rows = self.store.conn.execute(
                "SELECT workload_id, record FROM ms_tuning_records ORDER BY id").fetchall()
            return [TuningRecord.from_json(json.loads(text), self._workload(wid)) for wid, text in rows]

    def __len__(self) -> int:
        with self._lock:
            return self.store.conn.execute("SELECT count(*) FROM ms_tuning_records").fetchone()[0]
