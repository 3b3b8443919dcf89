"""Tuning through a real TVM RPC tracker and servers on loopback (remote CPU).
One tracker serves the module; each test starts servers under its own key."""
import io
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import shardtune
from shardtune.database import TuningDB
from shardtune.errors import UserError
from shardtune.kernels import get_template
from shardtune.tuner import measure
from shardtune.tuner.remote import _count, _summary

TUNE = [sys.executable, "-c", "import sys; from shardtune.cli import tune_main; sys.exit(tune_main())"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Rpc:
    """A tracker and servers as subprocesses, each in its own process group: TVM runs the
    real work in child processes that outlive a plain kill of the parent."""

    def __init__(self):
        self.port = free_port()
        self.procs = []
        self._start("tracker", "--port", str(self.port), "--port-end", str(self.port + 1))
        self._wait(lambda: _summary("127.0.0.1", self.port) is not None)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, what, *args):
        p = subprocess.Popen([sys.executable, "-m", f"tvm.exec.rpc_{what}", "--host", "127.0.0.1", "--silent", *args],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(p)
        return p

    def servers(self, key: str, n: int = 1) -> list:
        """Start `n` servers under `key` (at once: each takes seconds to import TVM) and
        wait until the tracker lists them."""
        ports = [free_port() for _ in range(n)]
        # --no-fork, as a CUDA GPU's server needs (a forked session cannot initialise CUDA)
        ps = [self._start("server", "--no-fork", "--port", str(port), "--port-end", str(port + 1),
                          "--tracker", self.addr, "--key", key) for port in ports]
        self._wait(lambda: self.count(key) == n)
        return ps

    def count(self, key: str) -> int:
        return _count(_summary("127.0.0.1", self.port), key)[0]

    @staticmethod
    def _wait(ready, timeout=60):
        deadline = time.time() + timeout
        while True:
            try:
                if ready():
                    return
            except (OSError, RuntimeError):
                pass
            assert time.time() < deadline, "RPC tracker/server did not come up"
            time.sleep(0.2)

    @staticmethod
    def kill(p):
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()

    def close(self, keep: int = 0):
        while len(self.procs) > keep:
            self.kill(self.procs.pop())


@pytest.fixture(scope="module")
def tracker():
    r = Rpc()
    yield r
    r.close()


@pytest.fixture
def rpc(tracker):
    """The module's tracker; the servers a test starts are killed after it."""
    yield tracker
    tracker.close(keep=1)


def kill_between_rounds(monkeypatch, rpc, kills: dict) -> list:
    """After measuring round n (1-based), kill the server kills[n] (its whole process group).
    Returns the rounds as they happen: (template, N, K, measurements)."""
    original, rounds = measure.Bench.measure_many, []

    def measure_many(self, jobs):
        out = original(self, jobs)
        rounds.append((jobs[0][1], jobs[0][2]["N"], jobs[0][2]["K"], out))
        if len(rounds) in kills:
            rpc.kill(kills[len(rounds)])
        return out

    monkeypatch.setattr(measure.Bench, "measure_many", measure_many)
    return rounds


@pytest.mark.slow
def test_tune_through_tracker_survives_lost_servers(rpc, tmp_path, monkeypatch):
    # Two servers under the key, so two measuring workers. One dies after the first round (the
    # other carries on), the other after the third (then nothing is left to measure on).
    a, b = rpc.servers("cpu", 2)
    rounds = kill_between_rounds(monkeypatch, rpc, {1: b, 3: a})
    monkeypatch.setattr(measure.Bench, "restart_grace_s", 2.0)   # no supervisor will bring them back
    monkeypatch.setenv("SHARDTUNE_OVERLAP", "1")   # real builds overlapping remote measurements
    db, out = tmp_path / "t.db", io.StringIO()
    recs = shardtune.tune(arch="cpu", shards=1, model="tiny", db=str(db), trials_per_kernel=2, progress=False,
                          rpc_tracker=rpc.addr, rpc_key="cpu", out=out, time_budget=120)
    text = out.getvalue()
    assert len(TuningDB.open_existing(db)) == len(recs)
    # Records for what the first three rounds measured, none after: the run went on to the end.
    measured = {key[:3] for key in rounds[:3]}
    assert len(measured) == 3 and len(rounds) > 3, text
    assert {(r.template, r.workload["N"], r.workload["K"]) for r in recs} == measured, text
    assert not any(m.ok for key in rounds[3:] for m in key[3])
    lost = [ln for ln in text.splitlines() if "trial(s) lost" in ln]
    assert len(lost) == 1 and "no device" in lost[0], text
    servers = set()
    for r in recs:
        assert r.max_rel_error < get_template(r.template).tolerance and r.latency_us > 0 and r.runs >= 10
        assert r.host == "127.0.0.1" and r.device.endswith(" CPU") and r.compute_units >= 1
        assert r.extra["rpc"]["tracker"] == rpc.addr and r.extra["rpc"]["key"] == "cpu"
        servers |= set(r.extra["rpc"]["servers"])
    assert len(servers) == 2, servers     # the first round ran on both, in parallel
    assert r.device in text


def tune_cli(*args, timeout=120):
    return subprocess.run([*TUNE, "--arch", "cpu", "--model", "tiny", "--no-progress", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_unreachable_tracker_is_one_line_and_writes_nothing(tmp_path):
    db = tmp_path / "t.db"
    t0 = time.time()
    r = tune_cli("--db", str(db), "--rpc-tracker", f"127.0.0.1:{free_port()}", "--rpc-key", "cpu")
    assert r.returncode == 2 and "cannot reach the RPC tracker" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not db.exists() and not (tmp_path / "t.studies.db").exists()
    assert time.time() - t0 < 30   # no minute of retries


def test_key_without_servers_stops_before_writing(rpc, tmp_path):
    db = tmp_path / "t.db"
    with pytest.raises(UserError, match="has no server under key 'gpu'"):
        shardtune.tune(arch="cpu", shards=1, model="tiny", db=str(db), rpc_tracker=rpc.addr, rpc_key="gpu",
                       progress=False)
    assert not db.exists()
