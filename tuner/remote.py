"""Measuring on devices registered with a TVM RPC tracker under a key.

Candidates are built here; each measuring worker (a process of Bench) holds one
session with one server, uploads a candidate, loads it there and measures it with
`measure.measure_on`, the same function local measurement uses. After any failure the
worker drops its session and asks the tracker for a new one at the next trial.

TVM's server serves one session at a time and ends it after the `session_timeout`
given at connection (2 run timeouts here), answering the client's pending call with an
RPCSessionTimeoutError: that is how a hung kernel is timed out, and the server goes on
serving. A worker starts a fresh session when less than a run timeout is left.
Whenever a session's process exits with an error, TVM's server stops serving for good
(tvm/rpc/server.py raises in its listening thread, the process stays): a kernel that
crashes does that, and so does a client that vanishes in the middle of a call (hence no
client-side timeout short of the session's). Run servers under a supervisor that restarts
them (benchmarks/rpc_tune_device.sh does)."""
from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import dataclass

from ..errors import UserError


class NoDevice(Exception):
    """The tracker has no server for the key, or none became free in time."""


@dataclass(frozen=True)
class RemoteConfig:
    host: str
    port: int
    key: str
    device_type: str          # "cpu", "cuda", "rocm": the device on the servers
    workers: int = 1          # measuring workers, one session each
    request_wait: float = 20  # how long a worker waits for a busy server to become free

    @property
    def tracker(self) -> str:
        return f"{self.host}:{self.port}"

    def servers(self) -> int | None:
        """How many servers the tracker lists under the key now; None if it cannot be asked."""
        try:
            return _count(_summary(self.host, self.port), self.key)[0]
        except (OSError, RuntimeError):
            return None


def parse_tracker(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--rpc-tracker {text!r}: use HOST:PORT, e.g. 127.0.0.1:9190")
    return host, int(port)


def _tracker_socket(host: str, port: int, timeout: float = 5) -> socket.socket:
    """A connection to the tracker. TVM's own client retries a refused connection for a
    minute; a tracker that is not there should be reported at once."""
    from tvm.rpc import base

    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", base.recvall(sock, 4))[0]
    except (OSError, RuntimeError, struct.error) as e:
        sock.close()
        raise RuntimeError(f"{host}:{port} did not answer as an RPC tracker ({e})") from None
    if magic != base.RPC_TRACKER_MAGIC:
        sock.close()
        raise RuntimeError(f"{host}:{port} is not an RPC tracker")
    return sock


def _summary(host: str, port: int) -> dict:
    from tvm.rpc import base

    sock = _tracker_socket(host, port)
    try:
        base.sendjson(sock, [base.TrackerCode.SUMMARY])
        code, value = base.recvjson(sock)
    finally:
        sock.close()
    if code != base.TrackerCode.SUCCESS:
        raise RuntimeError(f"tracker answered {code}")
    return value


def _count(summary: dict, key: str) -> tuple[int, int]:
    """(servers listed under `key`, of which free)."""
    listed = sum(1 for s in summary.get("server_info", []) if s.get("key") == "server:" + key)
    return listed, summary.get("queue_info", {}).get(key, {}).get("free", 0)


def connect(tracker: str, key: str, device_type: str, workers: int | None = None) -> RemoteConfig:
    """Check the tracker answers and lists servers under `key`; UserError otherwise.
    Workers default to the free servers (at least 1)."""
    host, port = parse_tracker(tracker)
    try:
        summary = _summary(host, port)
    except (OSError, RuntimeError) as e:
        raise UserError(f"cannot reach the RPC tracker at {tracker} ({e}): start one with "
                        f"`python -m tvm.exec.rpc_tracker --port {port}` or fix --rpc-tracker") from None
    listed, free = _count(summary, key)
    if not listed:
        keys = sorted({s["key"].split(":", 1)[-1] for s in summary.get("server_info", [])})
        raise UserError(f"the RPC tracker at {tracker} has no server under key {key!r} "
                        f"(keys: {', '.join(keys) or 'none'}): start one with `python -m tvm.exec.rpc_server "
                        f"--no-fork --tracker {tracker} --key {key}` or fix --rpc-key")
    if workers is not None and workers < 1:
        raise UserError("--rpc-workers must be at least 1")
    return RemoteConfig(host, port, key, device_type, workers or max(1, free))


def request(cfg: RemoteConfig, session_s: float = 0, wait: float | None = None):
    """A session with a free server under the key, and that server's address; waits for a
    busy server up to `wait` seconds (default cfg.request_wait)."""
    import tvm.rpc
    from tvm.rpc import base

    try:
        sock = _tracker_socket(cfg.host, cfg.port)
    except (OSError, RuntimeError) as e:
        raise NoDevice(f"tracker {cfg.tracker} unreachable ({e})") from None
    try:
        base.sendjson(sock, [base.TrackerCode.SUMMARY])
        if not _count(base.recvjson(sock)[1], cfg.key)[0]:
            # Nothing to wait for (all servers gone): fail now, the run goes on without this trial.
            raise NoDevice(f"no server under key {cfg.key!r}")
        # Listed but busy: wait our turn in the tracker's queue, a while.
        sock.settimeout(cfg.request_wait if wait is None else wait)
        base.sendjson(sock, [base.TrackerCode.REQUEST, cfg.key, "", 1])
        code, value = base.recvjson(sock)
        if code != base.TrackerCode.SUCCESS:
            raise RuntimeError(f"tracker answered {code}")
        url, port, matchkey = value
    except (OSError, RuntimeError, ValueError, TypeError) as e:
        raise NoDevice(f"no free server under key {cfg.key!r} ({type(e).__name__})") from None
    finally:
        sock.close()   # the tracker forgets a closed connection's request: no server is handed to nobody
    try:
        sess = tvm.rpc.connect(url, port, matchkey, session_timeout=session_s)
    except Exception as e:  # noqa: BLE001 - the server went away between tracker and us
        raise NoDevice(f"server {url}:{port} did not answer ({type(e).__name__})") from None
    return sess, f"{url}:{port}"


# --- in a measuring worker process --------------------------------------------------
_state = {"sess": None, "since": 0.0, "server": ""}


def _session(cfg: RemoteConfig, run_timeout: float, session_s: float, fresh: bool = False,
             wait: float | None = None):
    # The worker's call must end within its run timeout, waiting for a server included.
    wait = min(cfg.request_wait if wait is None else wait, max(1.0, run_timeout / 2))
    # A fresh session unless the measurement after this call has a run timeout left in this one
    # (and a little for the upload).
    margin = run_timeout + min(10.0, run_timeout / 2)
    if fresh or _state["sess"] is None or time.monotonic() - _state["since"] > session_s - margin:
        _state["sess"] = None   # dropping it closes the connection; the server takes the next client
        _state["sess"], _state["server"] = request(cfg, session_s, wait)
        _state["since"] = time.monotonic()
    return _state["sess"]


def stage(cfg: RemoteConfig, path: str, run_timeout: float, session_s: float, wait: float) -> str:
    """Hold a session (a new one if needed) and upload a candidate to its server; the server's
    address, or "" when no device could be had: the trial has not started, another worker may
    take it. A separate call from measure_remote, so waiting for a server is not measuring time."""
    try:
        sess = _session(cfg, run_timeout, session_s, wait=wait)
        try:
            sess.upload(path)
        except Exception:  # noqa: BLE001 - the server went away since the last trial: one fresh try
            sess = _session(cfg, run_timeout, session_s, fresh=True, wait=wait)
            sess.upload(path)
    except Exception:  # noqa: BLE001 - NoDevice, or a server that fails as soon as it is reached
        _state["sess"] = None
        return ""
    return _state["server"]


def measure_remote(cfg: RemoteConfig, path: str, template_name: str, wl: dict, repeat: int) -> dict:
    """measure_on the staged candidate, on the session's device."""
    from .measure import measure_on

    sess, name = _state["sess"], os.path.basename(path)
    try:
        res = measure_on(sess.device(cfg.device_type), lambda: sess.load_module(name), template_name, wl, repeat)
    except BaseException:
        _state["sess"] = None   # whatever broke, the next trial starts on a fresh session
        raise
    try:
        sess.remove(name)
    except Exception:  # noqa: BLE001 - a leftover file in the server's temporary folder is harmless
        pass
    return res


def copy_bandwidth_remote(cfg: RemoteConfig, run_timeout: float, session_s: float) -> float:
    from .measure import copy_bandwidth_on

    sess = _session(cfg, run_timeout, session_s)
    try:
        return copy_bandwidth_on(sess.device(cfg.device_type), sess.get_function)
    except BaseException:
        _state["sess"] = None
        raise


# --- in the tuning process ----------------------------------------------------------
def describe(cfg: RemoteConfig, arch) -> dict:
    """What the servers under the key are, from one of them: the fields a record uses to
    say where it was measured, plus `arch` (as --arch spells it) and, for CPUs, `mcpu` and
    `cores` to build for. UserError if the server has no such device."""
    try:
        sess, server = request(cfg)
    except NoDevice as e:
        raise UserError(f"no device under key {cfg.key!r} at {cfg.tracker}: {e}") from None
    dev = sess.device(cfg.device_type)
    if not dev.exist:
        raise UserError(f"the server {server} under key {cfg.key!r} has no {cfg.device_type} device")
    out = {"host": server.rsplit(":", 1)[0], "server": server}

    def call(name, *args):
        try:
            return sess.get_function(name)(*args)
        except Exception:  # noqa: BLE001 - a runtime-only TVM on the server lacks the LLVM helpers
            return None

    if cfg.device_type == "cpu":
        cpu, triple = call("target.llvm_get_system_cpu"), call("target.llvm_get_system_triple")
        cores = call("s_tir.meta_schedule.cpu_count", True) or call("runtime.NumThreads") or 1
        machine = triple.split("-")[0] if triple else arch.name
        out.update(device=f"{cpu} CPU" if cpu else f"CPU under RPC key {cfg.key}",
                   compute_units=int(cores), runtime_version="", arch=machine, mcpu=cpu, cores=int(cores))
    else:
        if cfg.device_type == "cuda":
            remote_arch = "sm_" + str(dev.compute_version).replace(".", "")
        else:
            remote_arch = str(dev.device_name).split(":")[0]   # gfx90a:sramecc+:xnack- -> gfx90a
        out.update(device=str(dev.device_name), compute_units=int(dev.multi_processor_count or 0),
                   runtime_version=str(dev.driver_version or dev.api_version or ""), arch=remote_arch)
    return out   # the session ends here: its server goes back to the tracker for the measuring workers
