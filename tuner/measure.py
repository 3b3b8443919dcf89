"""Build candidates in parallel worker processes; measure each one in a separate
process with a timeout, with a cold cache, after checking it against the NumPy
reference. A candidate that fails to build, hangs or crashes costs one trial.
Measuring happens on the local device, or on devices registered with a TVM RPC
tracker (tuner/remote.py); both go through `measure_on`."""
from __future__ import annotations

import collections
import hashlib
import os
import re
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np

# Rotate through enough copies of the inputs that each call finds them evicted
# from the last-level cache (H100: 50 MB of L2; CPUs: tens of MB of L3).
MIN_ROTATION_BYTES = 128 << 20
MAX_COPIES = 256
RPC_SESS_MASK = 128   # tvm.rpc.base.RPC_SESS_MASK: remote devices' type codes are offset by it


@dataclass
class Measurement:
    latency_us: float = float("nan")   # median
    spread_us: float = float("nan")    # interquartile range
    runs: int = 0
    rel_error: float = float("nan")
    error: str = ""                    # why it failed; empty when it succeeded
    source_sha: str = ""               # of the candidate's generated code (see source_sha)
    timing: str = ""                   # "graph" (back to back in a CUDA graph) or "launch" (one at a time)

    @property
    def ok(self) -> bool:
        return not self.error


def build(template_name: str, wl: dict, knobs: dict | None, target_json: dict, path: str,
          nvcc: bool = False) -> tuple[str, str]:
    """Compile one candidate (knobs None: TVM's dlight rules) into a shared library at `path`;
    returns (path, source_sha). With `nvcc`, CUDA source is also compiled to a cubin by nvcc:
    without a GPU driver TVM stops at CUDA source, and this proves the source builds (CI)."""
    import tvm

    from ..kernels import PASS_CONFIG, get_template

    tpl = get_template(template_name)
    target = tvm.target.Target(target_json)
    mod = tpl.schedule(wl, knobs, target) if knobs is not None else tpl.dlight_schedule(wl, target)
    with target, tvm.transform.PassContext(config=PASS_CONFIG):  # nvcc takes -arch from the current target
        ex = tvm.compile(mod, target=target)
        if nvcc and target.kind.name == "cuda":
            from tvm.support import nvcc as tvm_nvcc

            tvm_nvcc.compile_cuda(generated_source(ex), target_format="cubin", compiler="nvcc")
    ex.export_library(path)
    return path, source_sha(ex)


def generated_source(ex) -> str:
    """The code TVM generated for a compiled candidate: the device module's source (CUDA C
    for NVIDIA) on GPUs, the LLVM IR on CPUs."""
    mod = ex.mod
    return mod.imports[0].inspect_source() if mod.imports else mod.inspect_source("ll")


# LLVM IR names its alias-analysis (TBAA) nodes after heap addresses, alone ("0x5591e0a38bc0") or
# as the start of a longer name ("0x5591e0a38bc0.w4.b0", nodes of the buffers a kernel allocates).
_HEAP_ADDRESS = re.compile(r'"0x[0-9a-f]+(?=[".])')


def stable_text(source: str) -> str:
    """`source` with every heap address renumbered in order of appearance (p0, p1, ...)."""
    seen: dict[str, int] = {}
    return _HEAP_ADDRESS.sub(lambda m: f'"p{seen.setdefault(m.group(0), len(seen))}', source)


def source_sha(ex) -> str:
    """A hash of generated_source() that is the same for the same code in every process (the
    heap addresses in LLVM IR renumbered). Records store it (Record.source_sha); `shardtune
    regress` and `db refresh` compare."""
    return hashlib.sha256(stable_text(generated_source(ex)).encode()).hexdigest()[:16]


def measure_on(dev, load, template_name: str, wl: dict, repeat: int = 10, seed: int = 0) -> dict:
    """Check a candidate against the NumPy reference (computed here), then time it with a
    cold cache on `dev`, a local or a remote device; `load()` returns its module."""
    import tvm

    from ..kernels import get_template

    tpl = get_template(template_name)
    mod = load()
    func = mod["main"]
    inputs = case_inputs(tpl, wl, seed)
    args = [tvm.runtime.tensor(a, device=dev) for a in inputs]
    rel = tpl.relative_error(inputs, lambda n: run_poisoned(func, args, n, dev))
    if not np.isfinite(rel) or rel > tpl.tolerance:
        return {"error": f"numerics: relative error {rel:.3g} > {tpl.tolerance}", "rel_error": rel}

    size = sum(a.nbytes for a in inputs)
    l2 = getattr(dev, "l2_cache_size_bytes", None) or 0
    copies = int(min(MAX_COPIES, max(2, -(-max(MIN_ROTATION_BYTES, 2 * l2) // size))))
    # The copies are made on the device: for a remote one, the inputs cross the network once.
    sets = [args] + [[_copy(a, dev) for a in args] for _ in range(copies - 1)]
    replay_seconds = _graph_timer(dev)
    if replay_seconds is not None:
        # As a decode step runs it: back to back in a CUDA graph, one launch per copy.
        for s in sets:   # first-launch costs outside the capture
            func(*s)
        dev.sync()
        times = [t / copies * 1e6 for t in replay_seconds(lambda: [func(*s) for s in sets], max(repeat, 10))]
    else:
        timer = mod.time_evaluator("main", dev, number=1, repeat=1)
        for s in sets[:2]:  # warm-up: module load, first-launch costs
            timer(*s)
        times = []
        rounds = max(1, -(-repeat // copies))
        for _ in range(rounds):
            for s in sets:
                times.append(timer(*s).mean * 1e6)
    q1, med, q3 = np.percentile(times, [25, 50, 75])
    return {"latency_us": float(med), "spread_us": float(q3 - q1), "runs": len(times), "rel_error": rel,
            "timing": "graph" if replay_seconds is not None else "launch"}


# (template name, its source hash, workload, seed) -> (inputs, the reference's outputs for them):
# the latest few of this process. A search measures one workload many times, and making a 7B
# gate/up GEMV's 50 MB of random inputs and its reference took 4.3 s on a CI core, more than
# building and timing a candidate.
_CASES: collections.OrderedDict = collections.OrderedDict()
CASES_KEPT = 4


def case_inputs(tpl, wl: dict, seed: int) -> list:
    """The template's random inputs for `wl`, made once per process (only ever read: the device
    gets copies), and its reference outputs for them computed once: `tpl.reference` answers from
    here for these very inputs, so the template's own relative_error stays what checks them."""
    import json

    key = (tpl.name, tpl.source_hash, json.dumps(wl, sort_keys=True), seed)
    if key not in _CASES:
        inputs = tpl.inputs(wl, np.random.default_rng(seed))
        _CASES[key] = (inputs, type(tpl).reference(tpl, inputs))
        while len(_CASES) > CASES_KEPT:
            _CASES.popitem(last=False)
    _CASES.move_to_end(key)
    if "reference" not in vars(tpl):   # once per template object in this process
        compute = tpl.reference

        def reference(inputs):
            for known, refs in _CASES.values():
                if known is inputs:
                    return refs
            return compute(inputs)
        tpl.reference = reference
    return _CASES[key][0]


def _graph_timer(dev):
    """shardtune.graph.replay_seconds for a local CUDA device (it lives in the NCCL backend's
    library, built at first use), else None: remote devices and others are timed per launch.
    A kernel of a few microseconds timed per launch mostly measures the launch, which a decode
    step's CUDA graph does not pay, and would rank knobs by it."""
    if dev.dlpack_device_type() != 2 or os.environ.get("SHARDTUNE_TIMING") == "launch":   # kDLCUDA
        return None
    try:
        from tvm_ffi import get_global_func

        from ..runtime.ccl import load_ccl

        load_ccl("cuda")
        return get_global_func("shardtune.graph.replay_seconds")
    except Exception:  # noqa: BLE001 - no NCCL headers or toolkit here: per-launch timing still works
        return None


def _copy(a, dev):
    import tvm

    out = tvm.runtime.empty(a.shape, a.dtype, dev)
    a.copyto(out)
    return out


def measure(path: str, template_name: str, wl: dict, device_type: str, repeat: int = 10,
            seed: int = 0) -> dict:
    """Load a built candidate on the local device, check and time it. Runs in a worker."""
    import tvm

    return measure_on(tvm.runtime.device(device_type, 0), lambda: tvm.runtime.load_module(path),
                      template_name, wl, repeat, seed)


def run_poisoned(func, args, n_out: int, dev=None) -> list:
    """Fill the last `n_out` arguments with NaN, call, and return them as NumPy arrays."""
    for a in args[-n_out:]:
        a.copyfrom(np.full(a.shape, np.nan, a.dtype))
    func(*args)
    if dev is not None:
        dev.sync()
    return [a.numpy() for a in args[-n_out:]]


class Bench:
    """A pool of builder processes and measuring processes: one for the local device (it is
    shared), or `remote.workers`, each holding a session with a device under an RPC tracker key."""

    #: how long trials wait when the tracker lists no server at all: a supervisor restarting a
    #: server takes seconds. Counted once from when they vanished, not per trial.
    restart_grace_s = 20.0

    def __init__(self, target_json: dict, device_type: str | None, builders: int | None = None,
                 build_timeout: float = 120, run_timeout: float = 60, repeat: int = 10, remote=None):
        from tvm.support.popen_pool import PopenPoolExecutor

        self.target_json, self.device_type, self.repeat = target_json, device_type, repeat
        self.run_timeout, self.remote = run_timeout, remote
        # Remote trials are timed out by the server, which ends a session after session_s (a
        # measurement starts with at least run_timeout left): it stops a hung kernel and goes on
        # serving. Breaking the connection mid-call instead stops TVM's server for good.
        self.session_s = 2 * run_timeout
        self.dir = tempfile.TemporaryDirectory(prefix="shardtune-")
        self.n_builders = builders or max(1, os.cpu_count() or 1)
        # Builders' stderr is TVM's chatter (ROCm version guesses...); failures come back as exceptions.
        self.builders = PopenPoolExecutor(max_workers=self.n_builders, timeout=build_timeout,
                                          stderr=subprocess.DEVNULL)
        n = remote.workers if remote else 1
        timeout = self.session_s + 30 if remote else run_timeout   # remote: a backstop (network hangs)
        self.runners = [PopenPoolExecutor(max_workers=1, timeout=timeout) for _ in range(n)] if device_type else []
        self.holding = [False] * n          # which runners hold a remote session (used first: no reconnect)
        self.lost = collections.Counter()   # why trials were lost (a failed build or check is not lost)
        self.servers: set[str] = set()      # remote servers that measured something
        self._servers = None                # servers the tracker listed at the start of this round
        self._lock = threading.Lock()       # runners' threads count lost trials together
        self._none_since = None             # when the tracker last started listing no server
        self._n = 0
        self.ceiling_gbps = float("inf")   # set to the measured copy bandwidth
        self.nvcc = False                  # builds also compile CUDA source with nvcc (see build)
        self.source_sha: dict[str, str] = {}   # artifact path -> hash of its generated code

    @property
    def n_runners(self) -> int:
        return len(self.runners)

    def build_many(self, template_name: str, wl: dict, knob_list: list) -> list[tuple[str | None, str]]:
        """(artifact path or None, error) per candidate, built in parallel."""
        return self.build_each([(template_name, wl, knobs) for knobs in knob_list])

    def build_each(self, jobs: list[tuple[str, dict, dict | None]]) -> list[tuple[str | None, str]]:
        """(artifact path or None, error) per (template name, workload, knobs) job, built in
        parallel; the hash of each artifact's generated code is in self.source_sha[path]."""
        return self.collect_builds(self.submit_builds(jobs))

    @property
    def overlap_builds(self) -> bool:
        """Whether a search builds its next round while this one is measured: with
        `SHARDTUNE_OVERLAP=1` (not yet measured on a GPU, so not the default), and never where the
        builders share the CPU that is measured."""
        return (os.environ.get("SHARDTUNE_OVERLAP") == "1" and self.device_type is not None
                and (self.device_type != "cpu" or self.remote is not None))

    def submit_builds(self, jobs: list[tuple[str, dict, dict | None]]) -> list:
        """Start building (template name, workload, knobs) jobs; `collect_builds` waits for them."""
        futures = []
        for template_name, wl, knobs in jobs:
            self._n += 1
            path = os.path.join(self.dir.name, f"c{self._n}.so")
            futures.append(self.builders.submit(build, template_name, wl, knobs, self.target_json, path,
                                                self.nvcc))
        return futures

    def collect_builds(self, futures: list) -> list[tuple[str | None, str]]:
        out = []
        for f in futures:
            try:
                path, self.source_sha[path] = f.result()
                out.append((path, ""))
            except Exception as e:  # noqa: BLE001 - a failed build costs this trial only
                out.append((None, f"build: {_one_line(e)}"))
        return out

    def measure(self, path: str, template_name: str, wl: dict) -> Measurement:
        return self.measure_many([(path, template_name, wl)])[0]

    def measure_many(self, jobs: list[tuple[str, str, dict]]) -> list[Measurement]:
        """Measure (artifact path, template name, workload) jobs, in parallel over the runners;
        results in order. A runner that gets no device sits out and leaves its job to the others."""
        results: list[Measurement | None] = [None] * len(jobs)
        pending, runners, spare = list(range(len(jobs))), *self._runners_for_round()
        give_up = time.monotonic() + self.session_s
        while pending:
            if not runners:
                # Every runner sat out. Servers still listed are busy, perhaps with a hung kernel until
                # the server ends that session: wait for them. None listed: wait a restart's time.
                if not self.remote or not self._worth_waiting(give_up):
                    break
                runners, spare = self._runners_for_round()
            queue, retry, stayed = collections.deque(pending), [], []

            def work(r):
                while True:
                    try:
                        i = queue.popleft()
                    except IndexError:
                        break
                    m = self._measure_one(r, *jobs[i])
                    if m is None:
                        retry.append(i)
                        return
                    results[i] = m
                stayed.append(r)

            if len(runners) == 1:
                work(runners[0])
            else:
                threads = [threading.Thread(target=work, args=(r,)) for r in runners]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            # Runners left out of the round may still hold a live session where the one tried had none.
            pending, runners, spare = retry + list(queue), stayed + spare, []
        for i in pending:
            results[i] = self._lost(jobs[i][0], "no device", f"run: no free device under key {self.remote.key!r}")
        return results

    def _worth_waiting(self, give_up: float) -> bool:
        now, servers = time.monotonic(), self.remote.servers()
        if servers:
            self._none_since = None
            return now < give_up
        self._none_since = self._none_since or now
        time.sleep(1)   # trying again at once would fail at once
        return now < self._none_since + self.restart_grace_s

    def _runners_for_round(self) -> tuple[list[int], list[int]]:
        """(runners to use, spares). Remote: no more than the tracker lists servers (a dead server
        makes one sit out), those holding a session first."""
        order = sorted(range(len(self.runners)), key=lambda r: not self.holding[r])
        self._servers = self.remote.servers() if self.remote and len(order) > 1 else None
        n = len(order) if self._servers is None else max(1, self._servers)
        return order[:n], order[n:]

    def _measure_one(self, r: int, path: str, template_name: str, wl: dict) -> Measurement | None:
        """None: the runner got no remote device (the job is still to do)."""
        if self.remote:
            from .remote import measure_remote, stage

            # Waiting for a busy server is pointless when our other runners hold every listed one.
            others = sum(self.holding) - self.holding[r]
            wait = 2 if self._servers is not None and others >= self._servers else self.remote.request_wait
            try:
                server = self.runners[r].submit(stage, self.remote, path, self.run_timeout, self.session_s,
                                                wait).result()
            except Exception:  # noqa: BLE001 - the worker died or timed out before the trial started
                server = ""
            self.holding[r] = bool(server)
            if not server:
                return None
            self.servers.add(server)
            fn, args = measure_remote, (self.remote, path, template_name, wl, self.repeat)
        else:
            fn, args = measure, (path, template_name, wl, self.device_type, self.repeat)
        try:
            res = self.runners[r].submit(fn, *args).result()
        except TimeoutError:
            self.holding[r] = False
            return self._lost(path, "timed out", "run: timed out")
        except Exception as e:  # noqa: BLE001 - a crashing kernel or a lost device costs this trial only
            self.holding[r] = False
            if "RPCSessionTimeoutError" in str(e):   # the server ended the session: see session_s
                return self._lost(path, "timed out", "run: timed out (the RPC server ended the session)")
            # Remotely, a crashing kernel takes its session (and TVM's server) down: the two look alike.
            return self._lost(path, "device lost or kernel crashed" if self.remote else "crashed",
                              f"run: {_one_line(e)}")
        _remove(path)
        m = Measurement(**res)
        if m.ok:
            from ..kernels import get_template

            gbps = get_template(template_name).bytes_moved(wl) / (m.latency_us * 1e-6) / 1e9
            if gbps > self.ceiling_gbps:
                # Faster than a plain copy: the measurement is wrong (warm cache), not the kernel fast.
                m.error = f"measurement: {gbps:.0f} GB/s exceeds the copy bandwidth {self.ceiling_gbps:.0f} GB/s"
        return m

    def _lost(self, path: str, why: str, error: str) -> Measurement:
        _remove(path)
        with self._lock:
            self.lost[why] += 1
        return Measurement(error=error)

    def lost_summary(self) -> str:
        """One line: how many trials were lost and why; empty when none were."""
        if not self.lost:
            return ""
        return (f"{sum(self.lost.values())} trial(s) lost: "
                + ", ".join(f"{n} {why}" for why, n in self.lost.most_common()))

    def copy_bandwidth(self) -> float:
        """The device's copy bandwidth, measured on the device the candidates run on."""
        if self.remote:
            from .remote import copy_bandwidth_remote

            return self.runners[0].submit(copy_bandwidth_remote, self.remote, self.run_timeout,
                                          self.session_s).result()
        return self.runners[0].submit(copy_bandwidth, self.device_type).result()

    def close(self):
        self.builders.shutdown(wait=False)
        for r in self.runners:
            r.shutdown(wait=False)
        self.dir.cleanup()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return (type(e).__name__ + ": " + (lines[-1] if lines else ""))[:300]


def copy_bandwidth(device_type: str) -> float:
    """The local device's copy bandwidth (see copy_bandwidth_on). Runs in a worker."""
    import tvm

    return copy_bandwidth_on(tvm.runtime.device(device_type, 0), tvm.get_global_func)


def copy_bandwidth_on(dev, get_func, nbytes: int = 512 << 20, repeat: int = 10) -> float:
    """Device-to-device copy rate in GB/s, counting bytes read plus bytes written: the ceiling
    no kernel's achieved bandwidth may pass. `dev` may be remote (`get_func` is then the
    session's get_function): TVM's time evaluator runs and times the copy on the device's side,
    so no network round trip is counted. On CPUs the copy is one thread's memcpy."""
    import struct

    import tvm

    dev_type = dev.dlpack_device_type() % RPC_SESS_MASK
    if dev_type == 1:  # kDLCPU
        nbytes = min(nbytes, 256 << 20)
    src = tvm.runtime.empty((nbytes,), "uint8", dev)
    dst = tvm.runtime.empty((nbytes,), "uint8", dev)
    # (module None: time a global function) name, device, number, repeat, min_repeat_ms,
    # limit_zero_time_iterations, cooldown_interval_ms, repeats_to_cooldown, cache_flush_bytes, f_preproc
    feval = get_func("runtime.RPCTimeEvaluator")(None, "runtime.TVMTensorCopyFromTo", dev_type, dev.index,
                                                 1, repeat, 0, 100, 0, 1, 0, "")
    times = struct.unpack("@" + "d" * repeat, bytes(feval(src, dst)))
    return 2 * nbytes / float(np.median(times)) / 1e9
